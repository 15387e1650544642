// momcompress custom ops for onnxruntime's CPU execution provider (built by `momcompress build-ops`).
//
// Four ops in the domain "momcompress"; the first two on one core routine, "per-token selected rows":
//   given x (T, d) and, for each token t, a list of (row, scale) pairs into three row tables
//   gate, up, down (R_rows, d) (down transposed: down[r] is column r of W_down),
//     out[t] += sum over the list of scale * act(gate[row] . x[t]) * (up[row] . x[t]) * down[row].
// The rows are multiplied where they lie in the initializers (never copied), on onnxruntime's
// intra-op thread pool (KernelContext_ParallelFor), in fp32 arithmetic; the row tables may be
// float, float16 or bfloat16 (16-bit tables halve the bytes read).
//
// - MoMExperts (x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale[, accumulate]):
//   the routed experts of a frozen mixture-of-masks FFN (export/op.py). Token t weighs routed block r by
//   w[t, r] = sum_j top_w[t, j] * expert_block_scale[top_i[t, j], r]; block r is rows r*b .. r*b+b-1 of the
//   (R, b, d) tables seen as (R*b, d); its list is those rows with scale w[t, r] (blocks with w = 0 skipped).
// - SelectedRowsFFN (x, rows, scale, gate_rows, up_rows, down_rows[, accumulate]): the lists given directly,
//   rows (T, K) int64 (< 0: padding, skipped), scale (T, K) float.
//
// Work split: tokens in tiles of kTokenTile; a tile's entries are bucketed by row (counting sort) so each
// row is read once per tile and multiplied against every token of the tile that selected it (up to 4
// tokens per pass over the row). Many tiles: one task per tile, writing its tokens' outputs directly.
// Few tiles (decode): each tile's rows are split into ranges, one task per range with its own partial
// output, summed at the end (no atomics).
//
// - SelectFFN (x, x_threshold, gate_up, down, h_threshold): the per-token selector FFN of a frozen model
//   (export/select_op.py): x_s = x * (|x| > x_threshold); (g, u) = x_s @ gate_up (gate and up interleaved per
//   neuron); h = act(g) * u; out = (h * (|h| > h_threshold)) @ down. Up to max_tokens tokens per call
//   (decode), each token reads only the gate_up rows of the channels it keeps and the down rows of the neurons
//   it keeps, where they lie, in two parallel phases (a share of the kept channels' whole rows per task, then
//   a range of neurons per task, each with its own partial). More tokens: the union of the tokens' rows is
//   nearly every row, so the two products run as onnxruntime's own MatMul (invoked from the kernel, weights
//   not pre-packed) over the masked inputs with the activation and neuron threshold fused in between (fp32;
//   16-bit weights take the row path). The export routes many-token calls around this node instead. bf16 tables
//   beside fp32 x on a CPU with AMX-BF16: from kSelectAmxMinTokens tokens on, the AMX tile products of
//   amx_select.h (the tables packed once per node when they are constant initializers, fp32-exact arithmetic);
//   momcompress's OrtCausalLM then moves the export's switch so that every call comes here.
// - SelectHidden (gu, h_threshold): h = act(gu[:, 0::2]) * gu[:, 1::2] zeroed where |h| <= h_threshold, one pass;
//   the export runs it between two standard MatMuls (weights packed by onnxruntime) for calls with many tokens.
//
// Built against onnxruntime's C API headers of version ORT_API_VERSION (21: onnxruntime 1.21); it loads in
// that release and newer ones. In an older runtime, RegisterCustomOps fails with a message saying so.

#include <onnxruntime_c_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "amx_select.h"
#include "select_rows.h"

namespace {

const OrtApi* g_api = nullptr;
OrtMemoryInfo* g_cpu_info = nullptr;  // onnxruntime's CPU memory info (made at registration, kept for the process)
constexpr const char* kDomain = "momcompress";
constexpr int64_t kTokenTile = 16;  // tokens per tile (the x and output rows of a tile stay in L1/L2)
constexpr int kLanes = 16;          // independent accumulators per dot product (vectorisable without reassociation)

using namespace mom;

// ---------------------------------------------------------------------------------------- the core
// For one row and N tokens: g[i] = gate . x_i, u[i] = up . x_i (each row element read once for all N).
template <typename W, int N>
MOM_INLINE void row_dots(const W* __restrict gate, const W* __restrict up, const float* const* xs, int64_t d,
                         float* g, float* u) {
  float ag[N][kLanes] = {};
  float au[N][kLanes] = {};
  int64_t q = 0;
  for (; q + kLanes <= d; q += kLanes) {
    float gv[kLanes], uv[kLanes];
    for (int l = 0; l < kLanes; ++l) { gv[l] = to_f32(gate[q + l]); uv[l] = to_f32(up[q + l]); }
    for (int i = 0; i < N; ++i) {
      const float* __restrict x = xs[i] + q;
      for (int l = 0; l < kLanes; ++l) { ag[i][l] += gv[l] * x[l]; au[i][l] += uv[l] * x[l]; }
    }
  }
  for (int i = 0; i < N; ++i) {
    float sg = 0.0f, su = 0.0f;
    for (int l = 0; l < kLanes; ++l) { sg += ag[i][l]; su += au[i][l]; }
    for (int64_t r = q; r < d; ++r) {
      const float xv = xs[i][r];
      sg += to_f32(gate[r]) * xv;
      su += to_f32(up[r]) * xv;
    }
    g[i] = sg;
    u[i] = su;
  }
}

// outs[i] += h[i] * down for N tokens (the down row read once).
template <typename W, int N>
MOM_INLINE void row_axpy(const W* __restrict down, float* const* outs, const float* h, int64_t d) {
  float* o[N];
  for (int i = 0; i < N; ++i) o[i] = outs[i];
#pragma GCC ivdep
  for (int64_t q = 0; q < d; ++q) {
    const float dv = to_f32(down[q]);
    for (int i = 0; i < N; ++i) o[i][q] += h[i] * dv;
  }
}

template <typename W, int N>
MOM_INLINE void row_tokens(const W* gate, const W* up, const W* down, const float* const* xs, const float* scales,
                           float* const* outs, int64_t d, Act act) {
  float g[N], u[N], h[N];
  row_dots<W, N>(gate, up, xs, d, g, u);
  for (int i = 0; i < N; ++i) h[i] = activate(g[i], act) * u[i] * scales[i];
  row_axpy<W, N>(down, outs, h, d);
}

// A tile of tokens with its entries bucketed by row: row_ids[i] with entries [row_ptr[i], row_ptr[i+1]) of
// (tile-local token, scale).
struct Tile {
  int64_t t0 = 0, t1 = 0;
  std::vector<int32_t> row_ids;
  std::vector<int64_t> row_ptr;
  std::vector<int32_t> tok;
  std::vector<float> scale;
};

// The per-token lists in CSR form: token t owns entries [ptr[t], ptr[t+1]) of (row, scale).
struct TokenLists {
  std::vector<int64_t> ptr;
  std::vector<int32_t> row;
  std::vector<float> scale;
};

// Bucket the entries of tokens [t0, t1) by row (counting sort over the row ids: O(entries + rows)).
void build_tile(const TokenLists& lists, int64_t nrows, int64_t t0, int64_t t1, std::vector<int32_t>& count,
                Tile& tile) {
  tile.t0 = t0;
  tile.t1 = t1;
  count.assign(static_cast<size_t>(nrows), 0);
  const int64_t begin = lists.ptr[t0], end = lists.ptr[t1];
  for (int64_t p = begin; p < end; ++p) ++count[lists.row[p]];
  tile.row_ids.clear();
  tile.row_ptr.assign(1, 0);
  for (int64_t r = 0; r < nrows; ++r) {
    if (count[r]) {
      tile.row_ids.push_back(static_cast<int32_t>(r));
      const int64_t at = tile.row_ptr.back();
      tile.row_ptr.push_back(at + count[r]);
      count[r] = static_cast<int32_t>(tile.row_ids.size() - 1);  // now: the slot of row r
    }
  }
  std::vector<int64_t> fill(tile.row_ptr.begin(), tile.row_ptr.end() - 1);
  tile.tok.resize(static_cast<size_t>(end - begin));
  tile.scale.resize(static_cast<size_t>(end - begin));
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t p = lists.ptr[t]; p < lists.ptr[t + 1]; ++p) {
      const int64_t at = fill[count[lists.row[p]]]++;
      tile.tok[at] = static_cast<int32_t>(t - t0);
      tile.scale[at] = lists.scale[p];
    }
  }
}

// Rows [i0, i1) of a tile against its tokens; outputs at out + local_token * d.
template <typename W>
MOM_INLINE void run_rows_impl(const Tile& tile, int64_t i0, int64_t i1, const float* x, const W* gate, const W* up,
                              const W* down, int64_t d, Act act, float* out) {
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = tile.row_ids[i];
    const W* g = gate + r * d;
    const W* u = up + r * d;
    const W* dn = down + r * d;
    if (i + 1 < i1) {  // scattered rows (single neurons): start fetching the next row's lines early
      const int64_t rn = tile.row_ids[i + 1];
      __builtin_prefetch(gate + rn * d);
      __builtin_prefetch(up + rn * d);
      __builtin_prefetch(down + rn * d);
    }
    int64_t p = tile.row_ptr[i];
    const int64_t end = tile.row_ptr[i + 1];
    const float* xs[4];
    float* outs[4];
    float sc[4];
    while (end - p >= 4) {
      for (int k = 0; k < 4; ++k) {
        const int64_t lt = tile.tok[p + k];
        xs[k] = x + (tile.t0 + lt) * d;
        outs[k] = out + lt * d;
        sc[k] = tile.scale[p + k];
      }
      row_tokens<W, 4>(g, u, dn, xs, sc, outs, d, act);
      p += 4;
    }
    if (end - p >= 2) {
      for (int k = 0; k < 2; ++k) {
        const int64_t lt = tile.tok[p + k];
        xs[k] = x + (tile.t0 + lt) * d;
        outs[k] = out + lt * d;
        sc[k] = tile.scale[p + k];
      }
      row_tokens<W, 2>(g, u, dn, xs, sc, outs, d, act);
      p += 2;
    }
    if (end - p == 1) {
      const int64_t lt = tile.tok[p];
      xs[0] = x + (tile.t0 + lt) * d;
      outs[0] = out + lt * d;
      sc[0] = tile.scale[p];
      row_tokens<W, 1>(g, u, dn, xs, sc, outs, d, act);
    }
  }
}

MOM_MULTIVERSION void run_rows(const Tile& tile, int64_t i0, int64_t i1, const float* x, const float* gate,
                               const float* up, const float* down, int64_t d, Act act, float* out) {
  run_rows_impl<float>(tile, i0, i1, x, gate, up, down, d, act, out);
}
MOM_MULTIVERSION void run_rows(const Tile& tile, int64_t i0, int64_t i1, const float* x, const bf16* gate,
                               const bf16* up, const bf16* down, int64_t d, Act act, float* out) {
  run_rows_impl<bf16>(tile, i0, i1, x, gate, up, down, d, act, out);
}
MOM_MULTIVERSION void run_rows(const Tile& tile, int64_t i0, int64_t i1, const float* x, const f16* gate,
                               const f16* up, const f16* down, int64_t d, Act act, float* out) {
  run_rows_impl<f16>(tile, i0, i1, x, gate, up, down, d, act, out);
}

template <typename W>
struct Job {
  const TokenLists* lists;
  int64_t T, d, nrows;
  const float* x;
  const W *gate, *up, *down;
  Act act;
  float* out;  // (T, d) f32, accumulated into
  // many tiles: task i is tile i, built inside the task
  // few tiles: task i is range i of tile tile_of[i], partial output partial[i] (kTokenTile, d)
  bool split = false;
  std::vector<Tile>* tiles = nullptr;
  std::vector<int64_t> task_tile, task_i0, task_i1;
  std::vector<size_t> task_offset;  // where task i's partial output (its tile's tokens x d) starts in partial
  std::vector<float>* partial = nullptr;
};

template <typename W>
void run_task(void* data, size_t task) {
  Job<W>& job = *static_cast<Job<W>*>(data);
  if (!job.split) {
    const int64_t t0 = static_cast<int64_t>(task) * kTokenTile;
    const int64_t t1 = std::min(job.T, t0 + kTokenTile);
    Tile tile;
    std::vector<int32_t> count;
    build_tile(*job.lists, job.nrows, t0, t1, count, tile);
    run_rows(tile, 0, static_cast<int64_t>(tile.row_ids.size()), job.x, job.gate, job.up, job.down, job.d, job.act,
             job.out + t0 * job.d);
    return;
  }
  const Tile& tile = (*job.tiles)[job.task_tile[task]];
  float* partial = job.partial->data() + job.task_offset[task];
  run_rows(tile, job.task_i0[task], job.task_i1[task], job.x, job.gate, job.up, job.down, job.d, job.act, partial);
}

int64_t hardware_threads() {
  static const int64_t n = std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()));
  return n;
}

// Tasks a parallel section is cut into (two per hardware thread: onnxruntime hands them out as threads free up).
int64_t target_tasks() { return 2 * hardware_threads(); }

// out (T, d) f32 += the selected rows of every token (see the file's header).
template <typename W>
OrtStatus* selected_rows(const OrtKernelContext* ctx, const TokenLists& lists, int64_t T, int64_t d, int64_t nrows,
                         const float* x, const W* gate, const W* up, const W* down, Act act, float* out) {
  if (T == 0 || d == 0 || lists.row.empty()) return nullptr;
  Job<W> job;
  job.lists = &lists;
  job.T = T; job.d = d; job.nrows = nrows;
  job.x = x; job.gate = gate; job.up = up; job.down = down;
  job.act = act; job.out = out;
  const int64_t ntiles = (T + kTokenTile - 1) / kTokenTile;
  const int64_t want = target_tasks();
  std::vector<Tile> tiles;
  std::vector<float> partial;
  size_t ntasks;
  if (ntiles >= want) {
    ntasks = static_cast<size_t>(ntiles);
  } else {
    job.split = true;
    const int64_t per_tile = (want + ntiles - 1) / ntiles;
    size_t partial_size = 0;
    tiles.resize(static_cast<size_t>(ntiles));
    std::vector<int32_t> count;
    for (int64_t i = 0; i < ntiles; ++i) {
      Tile& tile = tiles[i];
      build_tile(lists, nrows, i * kTokenTile, std::min(T, (i + 1) * kTokenTile), count, tile);
      // ranges of rows with about the same number of (row, token) entries each
      const int64_t nr = static_cast<int64_t>(tile.row_ids.size());
      const int64_t entries = tile.row_ptr.back();
      int64_t start = 0;
      for (int64_t s = 0; s < per_tile && start < nr; ++s) {
        int64_t stop = nr;
        if (s + 1 < per_tile) {
          const int64_t goal = entries * (s + 1) / per_tile;
          stop = std::upper_bound(tile.row_ptr.begin() + start + 1, tile.row_ptr.end(), goal) - tile.row_ptr.begin() - 1;
          stop = std::max(stop, start + 1);
        }
        job.task_tile.push_back(i);
        job.task_i0.push_back(start);
        job.task_i1.push_back(stop);
        job.task_offset.push_back(partial_size);
        partial_size += static_cast<size_t>((tile.t1 - tile.t0) * d);
        start = stop;
      }
    }
    ntasks = job.task_tile.size();
    partial.assign(partial_size, 0.0f);  // decode: a few d-vectors, not whole tiles
    job.tiles = &tiles;
    job.partial = &partial;
  }
  OrtStatus* status = nullptr;
  if (ntasks == 1) {
    run_task<W>(&job, 0);
  } else {
    status = g_api->KernelContext_ParallelFor(ctx, run_task<W>, ntasks, 0, &job);
  }
  if (status) return status;
  if (job.split) {
    for (size_t task = 0; task < ntasks; ++task) {
      const Tile& tile = tiles[job.task_tile[task]];
      const float* part = partial.data() + job.task_offset[task];
      float* o = out + tile.t0 * d;
      const int64_t n = (tile.t1 - tile.t0) * d;
      for (int64_t q = 0; q < n; ++q) o[q] += part[q];
    }
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------- ONNX plumbing
struct Tensor {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  bool present = false;
  int64_t dim(size_t i) const { return shape[i]; }
};

#define MOM_RETURN_IF(status_expr)          \
  do {                                      \
    OrtStatus* _mom_status = (status_expr); \
    if (_mom_status) return _mom_status;    \
  } while (0)

OrtStatus* fail(const std::string& msg) { return g_api->CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str()); }

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "double";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED: return "undefined";
    default: return "another type";
  }
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

OrtStatus* read_info(const OrtTensorTypeAndShapeInfo* info, Tensor* t) {
  MOM_RETURN_IF(g_api->GetTensorElementType(info, &t->type));
  size_t rank = 0;
  MOM_RETURN_IF(g_api->GetDimensionsCount(info, &rank));
  t->shape.resize(rank);
  if (rank) MOM_RETURN_IF(g_api->GetDimensions(info, t->shape.data(), rank));
  return nullptr;
}

OrtStatus* get_input(const OrtKernelContext* ctx, size_t i, Tensor* t) {
  size_t count = 0;
  MOM_RETURN_IF(g_api->KernelContext_GetInputCount(ctx, &count));
  const OrtValue* value = nullptr;
  if (i < count) MOM_RETURN_IF(g_api->KernelContext_GetInput(ctx, i, &value));
  t->present = value != nullptr;
  if (!value) return nullptr;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  MOM_RETURN_IF(g_api->GetTensorTypeAndShape(value, &info));
  OrtStatus* s = read_info(info, t);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  MOM_RETURN_IF(s);
  void* data = nullptr;  // API 21 has no const accessor; the data is only read
  MOM_RETURN_IF(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  t->data = data;
  return nullptr;
}

bool is_float_type(ONNXTensorElementDataType t) {
  return t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ||
         t == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
}

OrtStatus* expect(const std::string& op, const char* name, const Tensor& t, size_t rank, bool model_float,
                  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED) {
  if (model_float ? !is_float_type(t.type) : t.type != type)
    return fail("momcompress::" + op + ": input " + name + " must be " +
                (model_float ? std::string("float, float16 or bfloat16") : std::string(type_name(type))) + ", got " +
                type_name(t.type));
  if (t.shape.size() != rank)
    return fail("momcompress::" + op + ": input " + name + " must have rank " + std::to_string(rank) + ", got shape " +
                shape_str(t.shape));
  return nullptr;
}

// x in any model float type -> f32 (T, d).
void load_f32(const Tensor& t, int64_t n, float* dst) {
  switch (t.type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: std::memcpy(dst, t.data, static_cast<size_t>(n) * 4); break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: {
      const bf16* s = static_cast<const bf16*>(t.data);
      for (int64_t i = 0; i < n; ++i) dst[i] = to_f32(s[i]);
      break;
    }
    default: {
      const f16* s = static_cast<const f16*>(t.data);
      for (int64_t i = 0; i < n; ++i) dst[i] = to_f32(s[i]);
    }
  }
}

void store(const float* src, int64_t n, ONNXTensorElementDataType type, void* dst) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: std::memcpy(dst, src, static_cast<size_t>(n) * 4); break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: {
      bf16* o = static_cast<bf16*>(dst);
      for (int64_t i = 0; i < n; ++i) from_f32(src[i], o + i);
      break;
    }
    default: {
      f16* o = static_cast<f16*>(dst);
      for (int64_t i = 0; i < n; ++i) from_f32(src[i], o + i);
    }
  }
}

OrtStatus* dispatch_rows(const OrtKernelContext* ctx, const TokenLists& lists, int64_t T, int64_t d, int64_t nrows,
                         const float* x, ONNXTensorElementDataType wtype, const void* g, const void* u, const void* dn,
                         Act act, float* out) {
  switch (wtype) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      return selected_rows<float>(ctx, lists, T, d, nrows, x, static_cast<const float*>(g),
                                  static_cast<const float*>(u), static_cast<const float*>(dn), act, out);
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16:
      return selected_rows<bf16>(ctx, lists, T, d, nrows, x, static_cast<const bf16*>(g), static_cast<const bf16*>(u),
                                 static_cast<const bf16*>(dn), act, out);
    default:
      return selected_rows<f16>(ctx, lists, T, d, nrows, x, static_cast<const f16*>(g), static_cast<const f16*>(u),
                                static_cast<const f16*>(dn), act, out);
  }
}

// Output (T, d) of x's type: f32 work buffer initialised with accumulate (or 0), filled, stored.
OrtStatus* finish(OrtKernelContext* ctx, const Tensor& x, std::vector<float>& acc) {
  OrtValue* out = nullptr;
  MOM_RETURN_IF(g_api->KernelContext_GetOutput(ctx, 0, x.shape.data(), x.shape.size(), &out));
  void* data = nullptr;
  MOM_RETURN_IF(g_api->GetTensorMutableData(out, &data));
  store(acc.data(), static_cast<int64_t>(acc.size()), x.type, data);
  return nullptr;
}

OrtStatus* init_accumulate(const std::string& op, const Tensor& x, const Tensor& acc_in, std::vector<float>& acc) {
  const int64_t n = x.dim(0) * x.dim(1);
  acc.assign(static_cast<size_t>(n), 0.0f);
  if (!acc_in.present) return nullptr;
  if (acc_in.type != x.type || acc_in.shape != x.shape)
    return fail("momcompress::" + op + ": accumulate must have x's type and shape " + shape_str(x.shape) + " (" +
                type_name(x.type) + "), got " + shape_str(acc_in.shape) + " (" + type_name(acc_in.type) + ")");
  load_f32(acc_in, n, acc.data());
  return nullptr;
}

OrtStatus* read_activation(const OrtKernelInfo* info, const std::string& op, Act* act) {
  size_t size = 0;
  OrtStatus* s = g_api->KernelInfoGetAttribute_string(info, "activation", nullptr, &size);
  if (s) {
    g_api->ReleaseStatus(s);
    return fail("momcompress::" + op + ": the node has no activation attribute (silu, gelu_tanh or gelu); re-export it");
  }
  std::string value(size, '\0');
  MOM_RETURN_IF(g_api->KernelInfoGetAttribute_string(info, "activation", &value[0], &size));
  value.resize(std::strlen(value.c_str()));
  if (value == "silu") *act = Act::Silu;
  else if (value == "gelu_tanh") *act = Act::GeluTanh;
  else if (value == "gelu") *act = Act::Gelu;
  else return fail("momcompress::" + op + ": activation must be silu, gelu_tanh or gelu, got '" + value + "'");
  return nullptr;
}

// ---------------------------------------------------------------------------------------- MoMExperts
struct MoMExpertsKernel {
  Act act = Act::Silu;
  int64_t top_k = -1;  // the attribute, when set: checked against top_i
};

OrtStatus* mom_experts_compute(void* kernel, OrtKernelContext* ctx) try {
  const auto& k = *static_cast<MoMExpertsKernel*>(kernel);
  const std::string op = "MoMExperts";
  Tensor x, top_w, top_i, g, u, dn, scale, acc_in;
  MOM_RETURN_IF(get_input(ctx, 0, &x));
  MOM_RETURN_IF(get_input(ctx, 1, &top_w));
  MOM_RETURN_IF(get_input(ctx, 2, &top_i));
  MOM_RETURN_IF(get_input(ctx, 3, &g));
  MOM_RETURN_IF(get_input(ctx, 4, &u));
  MOM_RETURN_IF(get_input(ctx, 5, &dn));
  MOM_RETURN_IF(get_input(ctx, 6, &scale));
  MOM_RETURN_IF(get_input(ctx, 7, &acc_in));
  MOM_RETURN_IF(expect(op, "x", x, 2, true));
  MOM_RETURN_IF(expect(op, "top_w", top_w, 2, false, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
  MOM_RETURN_IF(expect(op, "top_i", top_i, 2, false, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64));
  MOM_RETURN_IF(expect(op, "routed_gate", g, 3, true));
  MOM_RETURN_IF(expect(op, "routed_up", u, 3, true));
  MOM_RETURN_IF(expect(op, "routed_down", dn, 3, true));
  MOM_RETURN_IF(expect(op, "expert_block_scale", scale, 2, false, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
  const int64_t T = x.dim(0), d = x.dim(1), kk = top_i.dim(1);
  const int64_t R = g.dim(0), b = g.dim(1), E = scale.dim(0);
  if (top_w.shape != top_i.shape || top_i.dim(0) != T)
    return fail("momcompress::MoMExperts: top_w and top_i must both be (T, k) with T = " + std::to_string(T) +
                " (x's rows), got " + shape_str(top_w.shape) + " and " + shape_str(top_i.shape));
  if (k.top_k >= 0 && k.top_k != kk)
    return fail("momcompress::MoMExperts: the node's top_k is " + std::to_string(k.top_k) + " but top_i has " +
                std::to_string(kk) + " columns");
  if (u.shape != g.shape || dn.shape != g.shape || u.type != g.type || dn.type != g.type || g.dim(2) != d)
    return fail("momcompress::MoMExperts: routed_gate, routed_up and routed_down must share one type and shape (R, b, d) "
                "with d = " + std::to_string(d) + " (x's columns), got " + shape_str(g.shape) + " " + type_name(g.type) +
                ", " + shape_str(u.shape) + " " + type_name(u.type) + ", " + shape_str(dn.shape) + " " + type_name(dn.type));
  if (scale.dim(1) != R)
    return fail("momcompress::MoMExperts: expert_block_scale must be (E, R) with R = " + std::to_string(R) +
                " routed blocks, got " + shape_str(scale.shape));
  if (R * b > INT32_MAX) return fail("momcompress::MoMExperts: more than 2^31 routed rows");
  std::vector<float> acc;
  MOM_RETURN_IF(init_accumulate(op, x, acc_in, acc));
  const auto* tw = static_cast<const float*>(top_w.data);
  const auto* ti = static_cast<const int64_t*>(top_i.data);
  const auto* z = static_cast<const float*>(scale.data);
  // w[t, r] = sum_j top_w[t, j] z[top_i[t, j], r], then each token's rows: the b rows of every block with w != 0
  TokenLists lists;
  lists.ptr.assign(1, 0);
  std::vector<float> w(static_cast<size_t>(R));
  for (int64_t t = 0; t < T; ++t) {
    std::fill(w.begin(), w.end(), 0.0f);
    for (int64_t j = 0; j < kk; ++j) {
      const int64_t e = ti[t * kk + j];
      if (e < 0 || e >= E)
        return fail("momcompress::MoMExperts: top_i[" + std::to_string(t) + ", " + std::to_string(j) + "] = " +
                    std::to_string(e) + " is not an expert id in [0, " + std::to_string(E) + ")");
      const float wj = tw[t * kk + j];
      const float* zr = z + e * R;
      for (int64_t r = 0; r < R; ++r) w[r] += wj * zr[r];
    }
    for (int64_t r = 0; r < R; ++r) {
      if (w[r] != 0.0f) {
        for (int64_t j = 0; j < b; ++j) {
          lists.row.push_back(static_cast<int32_t>(r * b + j));
          lists.scale.push_back(w[r]);
        }
      }
    }
    lists.ptr.push_back(static_cast<int64_t>(lists.row.size()));
  }
  std::vector<float> xf(static_cast<size_t>(T * d));
  load_f32(x, T * d, xf.data());
  MOM_RETURN_IF(dispatch_rows(ctx, lists, T, d, R * b, xf.data(), g.type, g.data, u.data, dn.data, k.act, acc.data()));
  return finish(ctx, x, acc);
} catch (const std::bad_alloc&) {
  return g_api->CreateStatus(ORT_FAIL, "momcompress::MoMExperts: out of memory");
} catch (const std::exception& e) {
  return g_api->CreateStatus(ORT_FAIL, (std::string("momcompress::MoMExperts: ") + e.what()).c_str());
}

// ---------------------------------------------------------------------------------------- SelectedRowsFFN
struct SelectedRowsKernel {
  Act act = Act::Silu;
};

OrtStatus* selected_rows_compute(void* kernel, OrtKernelContext* ctx) try {
  const auto& k = *static_cast<SelectedRowsKernel*>(kernel);
  const std::string op = "SelectedRowsFFN";
  Tensor x, rows, scale, g, u, dn, acc_in;
  MOM_RETURN_IF(get_input(ctx, 0, &x));
  MOM_RETURN_IF(get_input(ctx, 1, &rows));
  MOM_RETURN_IF(get_input(ctx, 2, &scale));
  MOM_RETURN_IF(get_input(ctx, 3, &g));
  MOM_RETURN_IF(get_input(ctx, 4, &u));
  MOM_RETURN_IF(get_input(ctx, 5, &dn));
  MOM_RETURN_IF(get_input(ctx, 6, &acc_in));
  MOM_RETURN_IF(expect(op, "x", x, 2, false, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
  MOM_RETURN_IF(expect(op, "rows", rows, 2, false, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64));
  MOM_RETURN_IF(expect(op, "scale", scale, 2, false, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
  MOM_RETURN_IF(expect(op, "gate_rows", g, 2, true));
  MOM_RETURN_IF(expect(op, "up_rows", u, 2, true));
  MOM_RETURN_IF(expect(op, "down_rows", dn, 2, true));
  const int64_t T = x.dim(0), d = x.dim(1), K = rows.dim(1), R = g.dim(0);
  if (rows.dim(0) != T || scale.shape != rows.shape)
    return fail("momcompress::SelectedRowsFFN: rows and scale must both be (T, K) with T = " + std::to_string(T) +
                " (x's rows), got " + shape_str(rows.shape) + " and " + shape_str(scale.shape));
  if (u.shape != g.shape || dn.shape != g.shape || u.type != g.type || dn.type != g.type || g.dim(1) != d)
    return fail("momcompress::SelectedRowsFFN: gate_rows, up_rows and down_rows must share one type and shape (R, d) "
                "with d = " + std::to_string(d) + " (x's columns), got " + shape_str(g.shape) + " " + type_name(g.type) +
                ", " + shape_str(u.shape) + " " + type_name(u.type) + ", " + shape_str(dn.shape) + " " + type_name(dn.type));
  if (R > INT32_MAX) return fail("momcompress::SelectedRowsFFN: more than 2^31 rows");
  std::vector<float> acc;
  MOM_RETURN_IF(init_accumulate(op, x, acc_in, acc));
  const auto* ri = static_cast<const int64_t*>(rows.data);
  const auto* sc = static_cast<const float*>(scale.data);
  TokenLists lists;
  lists.ptr.assign(1, 0);
  lists.row.reserve(static_cast<size_t>(T * K));
  lists.scale.reserve(static_cast<size_t>(T * K));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < K; ++j) {
      const int64_t r = ri[t * K + j];
      if (r < 0) continue;  // padding
      if (r >= R)
        return fail("momcompress::SelectedRowsFFN: rows[" + std::to_string(t) + ", " + std::to_string(j) + "] = " +
                    std::to_string(r) + " is not a row of the (" + std::to_string(R) + ", d) tables");
      if (sc[t * K + j] == 0.0f) continue;
      lists.row.push_back(static_cast<int32_t>(r));
      lists.scale.push_back(sc[t * K + j]);
    }
    lists.ptr.push_back(static_cast<int64_t>(lists.row.size()));
  }
  MOM_RETURN_IF(dispatch_rows(ctx, lists, T, d, R, static_cast<const float*>(x.data), g.type, g.data, u.data, dn.data,
                              k.act, acc.data()));
  return finish(ctx, x, acc);
} catch (const std::bad_alloc&) {
  return g_api->CreateStatus(ORT_FAIL, "momcompress::SelectedRowsFFN: out of memory");
} catch (const std::exception& e) {
  return g_api->CreateStatus(ORT_FAIL, (std::string("momcompress::SelectedRowsFFN: ") + e.what()).c_str());
}

// ---------------------------------------------------------------------------------------- SelectFFN
constexpr int64_t kSelectMaxTokens = 8;     // default most tokens per call for the row path (MOMCOMPRESS_ORT_SELECT_MAX_TOKENS)

constexpr int64_t kSelectAmxMinTokens = 5;  // bf16 tables on AMX: the tile products from this many tokens on (rows below:
                                            // one layer of the default model, Xeon, cache-warm: rows 0.38 ms at 4
                                            // tokens against 0.50, AMX 0.53 at 5 against 0.58, 0.54 at 8 against 0.65)

struct SelectFFNKernel {
  Act act = Act::Silu;
  int64_t max_tokens = kSelectMaxTokens;
  OrtOp* matmul = nullptr;  // onnxruntime's MatMul (float) for the many-token path; null: rows only
  bool amx = false;         // AMX usable here and not turned off (MOMCOMPRESS_AMX=off)
  bool tables_constant = false;  // gate_up and down are constant initializers: their packed copies are kept
  std::mutex pack_mutex;
  const void* packed_from[2] = {nullptr, nullptr};
  std::vector<uint16_t> packed[2];  // gate_up, down packed for the AMX path (tables_constant)
  ~SelectFFNKernel() {
    if (matmul) g_api->ReleaseOp(matmul);
  }
};

#if MOM_HAVE_AMX
void amx_task(void* data, size_t task, void (*phase)(const AmxJob&, int64_t)) {
  phase(*static_cast<const AmxJob*>(data), static_cast<int64_t>(task));
}
void amx_split_task(void* data, size_t task) { amx_task(data, task, amx_split_x); }
void amx_gate_up_task(void* data, size_t task) { amx_task(data, task, amx_gate_up); }
void amx_hidden_task(void* data, size_t task) { amx_task(data, task, amx_hidden); }
void amx_down_task(void* data, size_t task) { amx_task(data, task, amx_down); }

// The bf16 tables (K, N) packed for the AMX path: the node's kept copy when they are constant (packed at the
// first call), else packed into `scratch` for this call.
const uint16_t* amx_packed(SelectFFNKernel& k, int which, const void* table, int64_t K, int64_t N,
                           std::vector<uint16_t>& scratch) {
  const int64_t blocks = round_up(N, kAmxBlock) / 16;
  if (!k.tables_constant) {
    scratch.resize(static_cast<size_t>(amx_packed_size(K, N)));
    amx_pack_blocks(static_cast<const uint16_t*>(table), K, N, scratch.data(), 0, blocks);
    return scratch.data();
  }
  std::lock_guard<std::mutex> lock(k.pack_mutex);
  if (k.packed_from[which] != table) {
    k.packed[which].resize(static_cast<size_t>(amx_packed_size(K, N)));
    amx_pack_blocks(static_cast<const uint16_t*>(table), K, N, k.packed[which].data(), 0, blocks);
    k.packed_from[which] = table;
  }
  return k.packed[which].data();
}
#endif


template <typename W>
void range_task(void* data, size_t task) {
  select_range(*static_cast<const SelectRows*>(data), static_cast<int64_t>(task), static_cast<const W*>(nullptr));
}

OrtStatus* parallel(const OrtKernelContext* ctx, void (*fn)(void*, size_t), int64_t tasks, void* data) {
  if (tasks == 1) {
    fn(data, 0);
    return nullptr;
  }
  return g_api->KernelContext_ParallelFor(ctx, fn, static_cast<size_t>(tasks), 0, data);
}

// The row path: the layer on x (T, d) into the node's output, one task per hardware thread (the tasks are
// independent; one per thread keeps each table row's piece long: see select_rows.h). The lists and buffers are
// kept per calling thread between calls (a decode step calls this once per layer: no allocation), and fp32 x
// and output are used where they lie.
OrtStatus* select_rows_path(OrtKernelContext* ctx, const Tensor& x, const float* x_thr, SelectRows& job,
                            ONNXTensorElementDataType wtype) {
  thread_local std::vector<float> xf, gu, partial, out;
  const int64_t size = job.T * job.d;
  const bool fp32_x = x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  const float* xv = static_cast<const float*>(x.data);
  if (!fp32_x) {
    xf.resize(static_cast<size_t>(size));
    load_f32(x, size, xf.data());
    xv = xf.data();
  }
  gather_kept(xv, x_thr, job);
  plan_tasks(job, hardware_threads(), gu, partial);
  const bool f32 = wtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, b16 = wtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
  MOM_RETURN_IF(parallel(ctx, f32 ? range_task<float> : b16 ? range_task<bf16> : range_task<f16>, job.ranges, &job));
  if (!fp32_x) {
    out.resize(static_cast<size_t>(size));
    sum_partials(job, out.data());
    return finish(ctx, x, out);
  }
  OrtValue* value = nullptr;
  void* data = nullptr;
  MOM_RETURN_IF(g_api->KernelContext_GetOutput(ctx, 0, x.shape.data(), x.shape.size(), &value));
  MOM_RETURN_IF(g_api->GetTensorMutableData(value, &data));
  sum_partials(job, static_cast<float*>(data));
  return nullptr;
}

// h = act(gu[:, 0::2]) * gu[:, 1::2] zeroed where |h| <= h_threshold, token by token: SelectHidden's work, and
// the middle of SelectFFN's many-token path.
struct HiddenAnyJob {
  const void* gu;  // (T, 2n) of type
  void* out;       // (T, n) of type
  ONNXTensorElementDataType type;
  const float* h_thr;
  int64_t T, n, per_task;
  Act act;
};

MOM_MULTIVERSION void hidden_any_tokens(const HiddenAnyJob& job, int64_t t0, int64_t t1) {
  std::vector<float> row, h(static_cast<size_t>(job.n));
  if (job.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) row.resize(static_cast<size_t>(2 * job.n));
  for (int64_t t = t0; t < t1; ++t) {
    const float* gu;
    if (job.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      gu = static_cast<const float*>(job.gu) + t * 2 * job.n;
    } else {
      Tensor src;
      src.type = job.type;
      src.data = static_cast<const char*>(job.gu) + t * 2 * job.n * 2;  // 16-bit values
      load_f32(src, 2 * job.n, row.data());
      gu = row.data();
    }
    float* dst = job.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? static_cast<float*>(job.out) + t * job.n : h.data();
    hidden_thresholded(gu, 0, 1, job.n, job.act, job.h_thr, dst);
    if (job.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      store(dst, job.n, job.type, static_cast<char*>(job.out) + t * job.n * 2);
  }
}

void hidden_any_task(void* data, size_t task) {
  const auto& job = *static_cast<const HiddenAnyJob*>(data);
  const int64_t t0 = static_cast<int64_t>(task) * job.per_task;
  hidden_any_tokens(job, t0, std::min(job.T, t0 + job.per_task));
}

// Split the tokens over onnxruntime's threads.
OrtStatus* run_hidden(const OrtKernelContext* ctx, HiddenAnyJob& job) {
  const int64_t tasks = std::min<int64_t>(job.T, target_tasks());
  job.per_task = (job.T + tasks - 1) / tasks;
  return parallel(ctx, hidden_any_task, (job.T + job.per_task - 1) / job.per_task, &job);
}

// An OrtValue over a float buffer of this shape (the caller releases it; the buffer outlives it).
OrtStatus* wrap_f32(float* data, const std::vector<int64_t>& shape, OrtValue** value) {
  if (!g_cpu_info) return fail("momcompress::SelectFFN: no CPU memory info (the library was not registered)");
  size_t count = 1;
  for (int64_t s : shape) count *= static_cast<size_t>(s);
  return g_api->CreateTensorWithDataAsOrtValue(g_cpu_info, data, count * sizeof(float), shape.data(), shape.size(),
                                               ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, value);
}

struct ValueGuard {
  std::vector<OrtValue*> values;
  ~ValueGuard() {
    for (OrtValue* v : values) g_api->ReleaseValue(v);
  }
};

// The many-token path (fp32 x and weights): out = MatMul(h_s, down), h_s from MatMul(x_s, gate_up).
OrtStatus* select_dense_path(const SelectFFNKernel& k, OrtKernelContext* ctx, const Tensor& x, const float* x_thr,
                             const OrtValue* gate_up, const OrtValue* down, const float* h_thr, int64_t n) {
  const int64_t T = x.dim(0), d = x.dim(1);
  std::vector<float> xs(static_cast<size_t>(T * d)), gu(static_cast<size_t>(T * 2 * n)), hs(static_cast<size_t>(T * n));
  const auto* xv = static_cast<const float*>(x.data);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < d; ++j) {
      const float v = xv[t * d + j];
      xs[t * d + j] = std::fabs(v) > x_thr[j] ? v : 0.0f;
    }
  ValueGuard guard;
  OrtValue *xs_value = nullptr, *gu_value = nullptr, *hs_value = nullptr, *out = nullptr;
  MOM_RETURN_IF(wrap_f32(xs.data(), {T, d}, &xs_value));
  guard.values.push_back(xs_value);
  MOM_RETURN_IF(wrap_f32(gu.data(), {T, 2 * n}, &gu_value));
  guard.values.push_back(gu_value);
  MOM_RETURN_IF(wrap_f32(hs.data(), {T, n}, &hs_value));
  guard.values.push_back(hs_value);
  const OrtValue* first[2] = {xs_value, gate_up};
  MOM_RETURN_IF(g_api->InvokeOp(ctx, k.matmul, first, 2, &gu_value, 1));
  HiddenAnyJob job{gu.data(), hs.data(), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, h_thr, T, n, 0, k.act};
  MOM_RETURN_IF(run_hidden(ctx, job));
  MOM_RETURN_IF(g_api->KernelContext_GetOutput(ctx, 0, x.shape.data(), x.shape.size(), &out));
  const OrtValue* second[2] = {hs_value, down};
  return g_api->InvokeOp(ctx, k.matmul, second, 2, &out, 1);
}

OrtStatus* select_ffn_compute(void* kernel, OrtKernelContext* ctx) try {
  auto& k = *static_cast<SelectFFNKernel*>(kernel);
  const std::string op = "SelectFFN";
  Tensor x, x_thr, gu, dn, h_thr;
  MOM_RETURN_IF(get_input(ctx, 0, &x));
  MOM_RETURN_IF(get_input(ctx, 1, &x_thr));
  MOM_RETURN_IF(get_input(ctx, 2, &gu));
  MOM_RETURN_IF(get_input(ctx, 3, &dn));
  MOM_RETURN_IF(get_input(ctx, 4, &h_thr));
  MOM_RETURN_IF(expect(op, "x", x, 2, true));
  MOM_RETURN_IF(expect(op, "x_threshold", x_thr, 1, false, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
  MOM_RETURN_IF(expect(op, "gate_up", gu, 2, true));
  MOM_RETURN_IF(expect(op, "down", dn, 2, true));
  MOM_RETURN_IF(expect(op, "h_threshold", h_thr, 1, false, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
  const int64_t T = x.dim(0), d = x.dim(1), n = dn.dim(0);
  if (x_thr.dim(0) != d)
    return fail("momcompress::SelectFFN: x_threshold must be (d,) with d = " + std::to_string(d) + " (x's columns), got " +
                shape_str(x_thr.shape));
  if (gu.dim(0) != d || gu.dim(1) != 2 * n || dn.dim(1) != d || gu.type != dn.type)
    return fail("momcompress::SelectFFN: gate_up must be (d, 2F') and down (F', d) of one type with d = " +
                std::to_string(d) + " (x's columns), got " + shape_str(gu.shape) + " " + type_name(gu.type) + " and " +
                shape_str(dn.shape) + " " + type_name(dn.type));
  if (h_thr.dim(0) != n)
    return fail("momcompress::SelectFFN: h_threshold must be (F',) with F' = " + std::to_string(n) + " (down's rows), got " +
                shape_str(h_thr.shape));
  if (d > INT32_MAX) return fail("momcompress::SelectFFN: more than 2^31 channels");
  const auto* xt = static_cast<const float*>(x_thr.data);
  const auto* ht = static_cast<const float*>(h_thr.data);
  if (T == 0 || n == 0) {
    std::vector<float> zeros(static_cast<size_t>(T * d), 0.0f);
    return finish(ctx, x, zeros);
  }
#if MOM_HAVE_AMX
  if (k.amx && T >= kSelectAmxMinTokens && x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT &&
      gu.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16) {
    // Kept per calling thread between calls, like the PyTorch side's (no allocation and zero-fill per layer).
    thread_local std::vector<uint16_t> scratch_gu, scratch_dn, xparts, hparts;
    thread_local std::vector<float> gu_out, y;
    AmxJob job;
    job.T = T; job.d = d; job.n = n; job.tasks = std::max<int64_t>(1, target_tasks());
    job.x = static_cast<const float*>(x.data); job.x_thr = xt; job.h_thr = ht; job.act = k.act;
    job.gate_up_packed = amx_packed(k, 0, gu.data, d, 2 * n, scratch_gu);
    job.down_packed = amx_packed(k, 1, dn.data, n, d, scratch_dn);
    amx_plan(job, xparts, hparts, gu_out, y);
    MOM_RETURN_IF(parallel(ctx, amx_split_task, job.tasks, &job));
    MOM_RETURN_IF(parallel(ctx, amx_gate_up_task, job.tasks, &job));
    MOM_RETURN_IF(parallel(ctx, amx_hidden_task, job.tasks, &job));
    MOM_RETURN_IF(parallel(ctx, amx_down_task, job.tasks, &job));
    OrtValue* out = nullptr;
    void* data = nullptr;
    MOM_RETURN_IF(g_api->KernelContext_GetOutput(ctx, 0, x.shape.data(), x.shape.size(), &out));
    MOM_RETURN_IF(g_api->GetTensorMutableData(out, &data));
    amx_finish(job, static_cast<float*>(data));  // x is fp32 here, so is the output
    return nullptr;
  }
#endif
  const bool fp32 = x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && gu.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (T > k.max_tokens && fp32 && k.matmul) {
    const OrtValue *gu_value = nullptr, *dn_value = nullptr;
    MOM_RETURN_IF(g_api->KernelContext_GetInput(ctx, 2, &gu_value));
    MOM_RETURN_IF(g_api->KernelContext_GetInput(ctx, 3, &dn_value));
    return select_dense_path(k, ctx, x, xt, gu_value, dn_value, ht, n);
  }
  thread_local SelectRows job;
  job.T = T; job.d = d; job.n = n; job.h_thr = ht; job.act = k.act;
  job.gate_up = gu.data; job.down = dn.data;
  return select_rows_path(ctx, x, xt, job, gu.type);
} catch (const std::bad_alloc&) {
  return g_api->CreateStatus(ORT_FAIL, "momcompress::SelectFFN: out of memory");
} catch (const std::exception& e) {
  return g_api->CreateStatus(ORT_FAIL, (std::string("momcompress::SelectFFN: ") + e.what()).c_str());
}

// ---------------------------------------------------------------------------------------- SelectHidden
// h = act(gu[:, 0::2]) * gu[:, 1::2], zeroed where |h| <= h_threshold: the middle of a SelectFFN layer between
// two MatMuls (export/select_op.py puts it there for calls with many tokens), one pass over gu.
struct SelectHiddenKernel {
  Act act = Act::Silu;
};

OrtStatus* select_hidden_compute(void* kernel, OrtKernelContext* ctx) try {
  const auto& k = *static_cast<SelectHiddenKernel*>(kernel);
  const std::string op = "SelectHidden";
  Tensor gu, h_thr;
  MOM_RETURN_IF(get_input(ctx, 0, &gu));
  MOM_RETURN_IF(get_input(ctx, 1, &h_thr));
  MOM_RETURN_IF(expect(op, "gu", gu, 2, true));
  MOM_RETURN_IF(expect(op, "h_threshold", h_thr, 1, false, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
  const int64_t T = gu.dim(0), n = h_thr.dim(0);
  if (gu.dim(1) != 2 * n)
    return fail("momcompress::SelectHidden: gu must be (T, 2F') with F' = " + std::to_string(n) + " (h_threshold's length), got " +
                shape_str(gu.shape));
  const int64_t shape[2] = {T, n};
  OrtValue* out = nullptr;
  MOM_RETURN_IF(g_api->KernelContext_GetOutput(ctx, 0, shape, 2, &out));
  void* data = nullptr;
  MOM_RETURN_IF(g_api->GetTensorMutableData(out, &data));
  if (T == 0 || n == 0) return nullptr;
  HiddenAnyJob job{gu.data, data, gu.type, static_cast<const float*>(h_thr.data), T, n, 0, k.act};
  return run_hidden(ctx, job);
} catch (const std::bad_alloc&) {
  return g_api->CreateStatus(ORT_FAIL, "momcompress::SelectHidden: out of memory");
} catch (const std::exception& e) {
  return g_api->CreateStatus(ORT_FAIL, (std::string("momcompress::SelectHidden: ") + e.what()).c_str());
}

// ---------------------------------------------------------------------------------------- OrtCustomOp glue
// Every input is declared "any type" so that a wrong type reaches our checks (a clear message) instead of
// failing kernel matching; the output takes x's type and shape (InferOutputShapeFn).
struct OpDef : OrtCustomOp {
  const char* name;
  size_t inputs;
  bool last_optional;  // the last input (accumulate) is optional
  bool any_float_x;    // x may be float, float16 or bfloat16 (else float only)
  bool halve_last = false;  // the output is (T, x's columns / 2) (SelectHidden), else x's shape
};

OrtStatus* infer_output(const OrtCustomOp* base, OrtShapeInferContext* ctx) {
  const auto* def = static_cast<const OpDef*>(base);
  size_t count = 0;
  MOM_RETURN_IF(g_api->ShapeInferContext_GetInputCount(ctx, &count));
  const size_t required = def->inputs - (def->last_optional ? 1 : 0);
  if (count < required)
    return fail(std::string("momcompress::") + def->name + " needs at least " + std::to_string(required) +
                " inputs, got " + std::to_string(count));
  OrtTensorTypeAndShapeInfo* info = nullptr;
  MOM_RETURN_IF(g_api->ShapeInferContext_GetInputTypeShape(ctx, 0, &info));
  Tensor x;
  OrtStatus* s = read_info(info, &x);
  if (!s && x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED) {
    const bool any = def->any_float_x;
    if (any ? !is_float_type(x.type) : x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      s = fail(std::string("momcompress::") + def->name + ": input x must be " +
               (any ? "float, float16 or bfloat16" : "float") + ", got " + type_name(x.type));
    else if (!x.shape.empty() && x.shape.size() != 2)
      s = fail(std::string("momcompress::") + def->name + ": input x must have rank 2 (T, d), got shape " +
               shape_str(x.shape));
  }
  if (!s && def->halve_last) {  // SelectHidden: (T, 2F') -> (T, F')
    OrtTensorTypeAndShapeInfo* out = nullptr;
    s = g_api->CreateTensorTypeAndShapeInfo(&out);
    if (!s) s = g_api->SetTensorElementType(out, x.type);
    std::vector<int64_t> dims = x.shape;
    if (dims.size() == 2 && dims[1] > 0) dims[1] /= 2;
    else if (dims.size() == 2) dims[1] = -1;
    if (!s) s = g_api->SetDimensions(out, dims.data(), dims.size());
    // unknown dimensions keep the input's symbolic names (an unnamed -1 reads as a fixed size to onnxruntime)
    std::vector<const char*> names(dims.size(), "");
    if (!s && !dims.empty()) s = g_api->GetSymbolicDimensions(info, names.data(), names.size());
    if (!s && names.size() == 2 && dims[1] < 0) names[1] = "";
    if (!s) s = g_api->SetSymbolicDimensions(out, names.data(), names.size());
    if (!s) s = g_api->ShapeInferContext_SetOutputTypeShape(ctx, 0, out);
    if (out) g_api->ReleaseTensorTypeAndShapeInfo(out);
    return s;
  }
  if (!s) s = g_api->ShapeInferContext_SetOutputTypeShape(ctx, 0, info);
  return s;  // info belongs to the context (onnxruntime keeps it in a unique_ptr): not released here
}

template <typename K>
void destroy_kernel(void* kernel) { delete static_cast<K*>(kernel); }

OrtStatus* create_mom_experts(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) try {
  auto k = new MoMExpertsKernel();
  OrtStatus* s = read_activation(info, "MoMExperts", &k->act);
  if (s) { delete k; return s; }
  int64_t top_k = -1;
  OrtStatus* missing = g_api->KernelInfoGetAttribute_int64(info, "top_k", &top_k);
  if (missing) { g_api->ReleaseStatus(missing); top_k = -1; }
  k->top_k = top_k;
  *kernel = k;
  return nullptr;
} catch (const std::exception& e) {
  return g_api->CreateStatus(ORT_FAIL, e.what());
}

OrtStatus* create_selected_rows(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) try {
  auto k = new SelectedRowsKernel();
  OrtStatus* s = read_activation(info, "SelectedRowsFFN", &k->act);
  if (s) { delete k; return s; }
  *kernel = k;
  return nullptr;
} catch (const std::exception& e) {
  return g_api->CreateStatus(ORT_FAIL, e.what());
}

OrtStatus* create_select_ffn(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) try {
  auto k = new SelectFFNKernel();
  OrtStatus* s = read_activation(info, "SelectFFN", &k->act);
  if (s) { delete k; return s; }
  if (const char* env = std::getenv("MOMCOMPRESS_ORT_SELECT_MAX_TOKENS")) {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    if (end == env || *end != '\0' || v < 0) {
      delete k;
      return fail(std::string("MOMCOMPRESS_ORT_SELECT_MAX_TOKENS must be a whole number >= 0, got '") + env + "'");
    }
    k->max_tokens = v;
  }
  const char* amx_env = std::getenv("MOMCOMPRESS_AMX");
  k->amx = amx_usable() && !(amx_env && std::string(amx_env) == "off");
  if (k->amx) {  // tables that are constant initializers are packed once; others at every call
    int constant[2] = {0, 0};
    for (int i = 0; i < 2; ++i) {
      const OrtValue* value = nullptr;
      OrtStatus* st = g_api->KernelInfoGetConstantInput_tensor(info, 2 + i, &constant[i], &value);
      if (st) {
        g_api->ReleaseStatus(st);
        constant[i] = 0;
      }
    }
    k->tables_constant = constant[0] && constant[1];
  }
  // onnxruntime's own MatMul for the many-token path; where this build cannot make one, every call takes rows
  const char* names[1] = {"T"};
  const ONNXTensorElementDataType types[1] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  OrtStatus* no_matmul = g_api->CreateOp(info, "MatMul", "", 13, names, types, 1, nullptr, 0, 2, 1, &k->matmul);
  if (no_matmul) {
    g_api->ReleaseStatus(no_matmul);
    k->matmul = nullptr;
  }
  *kernel = k;
  return nullptr;
} catch (const std::exception& e) {
  return g_api->CreateStatus(ORT_FAIL, e.what());
}

OrtStatus* create_select_hidden(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) try {
  auto k = new SelectHiddenKernel();
  OrtStatus* s = read_activation(info, "SelectHidden", &k->act);
  if (s) { delete k; return s; }
  *kernel = k;
  return nullptr;
} catch (const std::exception& e) {
  return g_api->CreateStatus(ORT_FAIL, e.what());
}

void define_op(OpDef& op, const char* name, size_t inputs, bool last_optional, bool any_float_x,
               decltype(OrtCustomOp::CreateKernelV2) create, decltype(OrtCustomOp::KernelComputeV2) compute,
               decltype(OrtCustomOp::KernelDestroy) destroy) {
  std::memset(static_cast<OrtCustomOp*>(&op), 0, sizeof(OrtCustomOp));
  op.name = name;
  op.inputs = inputs;
  op.last_optional = last_optional;
  op.any_float_x = any_float_x;
  op.version = ORT_API_VERSION;
  op.GetName = [](const OrtCustomOp* o) { return static_cast<const OpDef*>(o)->name; };
  op.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return "CPUExecutionProvider"; };
  op.GetInputTypeCount = [](const OrtCustomOp* o) { return static_cast<const OpDef*>(o)->inputs; };
  op.GetInputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op.GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; };
  op.GetInputCharacteristic = [](const OrtCustomOp* o, size_t i) {
    const auto* def = static_cast<const OpDef*>(o);
    return def->last_optional && i + 1 == def->inputs ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.CreateKernelV2 = create;
  op.KernelComputeV2 = compute;
  op.KernelDestroy = destroy;
  op.InferOutputShapeFn = infer_output;
  op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
  op.GetEndVersion = [](const OrtCustomOp*) { return 1; };
}

OpDef g_mom_experts, g_selected_rows, g_select_ffn, g_select_hidden;

}  // namespace

extern "C" {

// 1 when SelectFFN's AMX path can run here (CPU features and the OS's permission), else 0 (for the Python side,
// which moves the export's switch so that long calls reach SelectFFN; MOMCOMPRESS_AMX=off is checked there too).
__attribute__((visibility("default"))) int momcompress_ort_amx_usable() { return mom::amx_usable() ? 1 : 0; }


// The C API version this library was compiled against (read by momcompress before registering it).
__attribute__((visibility("default"))) int MomcompressOrtOpsApiVersion() { return ORT_API_VERSION; }

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                 const OrtApiBase* base) {
  const OrtApi* api = base->GetApi(ORT_API_VERSION);
  if (!api) {
    // This runtime is older than the headers: say so with the oldest API, which every runtime serves.
    const OrtApi* v1 = base->GetApi(1);
    const std::string msg = std::string("the momcompress ops library was built against onnxruntime C API version ") +
                            std::to_string(ORT_API_VERSION) + " (onnxruntime 1." + std::to_string(ORT_API_VERSION) +
                            "), newer than this onnxruntime (" + base->GetVersionString() +
                            "): upgrade onnxruntime, or rebuild it against older headers with "
                            "`ORT_INCLUDE_DIR=... momcompress build-ops --force`";
    return v1 ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  g_api = api;
  if (!g_cpu_info) MOM_RETURN_IF(api->CreateCpuMemoryInfo(OrtDeviceAllocator, OrtMemTypeDefault, &g_cpu_info));
  define_op(g_mom_experts, "MoMExperts", 8, true, true, create_mom_experts, mom_experts_compute,
            destroy_kernel<MoMExpertsKernel>);
  define_op(g_selected_rows, "SelectedRowsFFN", 7, true, false, create_selected_rows, selected_rows_compute,
            destroy_kernel<SelectedRowsKernel>);
  define_op(g_select_ffn, "SelectFFN", 5, false, true, create_select_ffn, select_ffn_compute,
            destroy_kernel<SelectFFNKernel>);
  define_op(g_select_hidden, "SelectHidden", 2, false, true, create_select_hidden, select_hidden_compute,
            destroy_kernel<SelectHiddenKernel>);
  g_select_hidden.halve_last = true;
  OrtCustomOpDomain* domain = nullptr;
  MOM_RETURN_IF(api->CreateCustomOpDomain(kDomain, &domain));
  // The domain must outlive every session made with these options: it is kept for the life of the process.
  MOM_RETURN_IF(api->CustomOpDomain_Add(domain, &g_mom_experts));
  MOM_RETURN_IF(api->CustomOpDomain_Add(domain, &g_selected_rows));
  MOM_RETURN_IF(api->CustomOpDomain_Add(domain, &g_select_ffn));
  MOM_RETURN_IF(api->CustomOpDomain_Add(domain, &g_select_hidden));
  return api->AddCustomOpDomain(options, domain);
}

}  // extern "C"
