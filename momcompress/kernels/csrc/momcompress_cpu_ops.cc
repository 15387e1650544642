// momcompress's compiled CPU ops for the PyTorch runtime (built by `momcompress build-ops`, or at first use;
// loaded with ctypes by momcompress/kernels/cpu_native.py).
//
// momcompress_select_ffn_rows: the per-token selector FFN of a frozen layer on few tokens (decode), reading
// only the rows each token keeps, where they lie (select_rows.h has the algorithm). It runs on OpenMP threads:
// loaded into a process that has imported torch, the library binds to the OpenMP runtime torch already loaded
// (one runtime, one thread pool: torch's ops and this kernel take turns on the same threads instead of
// fighting over the cores).

#include <omp.h>

#include <cstdint>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "amx_select.h"
#include "select_rows.h"

#define MOM_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using namespace mom;

// Table element types, as the Python side passes them.
enum WeightType { kF32 = 0, kBF16 = 1, kF16 = 2 };

template <typename W>
void run(SelectRows& job, int threads) {
  const W* tag = nullptr;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < job.ranges; ++b) select_range(job, b, tag);
}

thread_local std::string g_error;  // the calling thread's last error (momcompress_cpu_ops_last_error)

// f(), with an exception turned into 1 and its message in g_error (entry points must not throw into Python).
template <typename F>
int guarded(F&& f) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    g_error = "out of memory";
  } catch (const std::exception& e) {
    g_error = e.what();
  }
  return 1;
}

}  // namespace

// A frozen selector layer as the Python side prepares it once (cpu_native.RowKernel): the tables stay where
// they are, only their addresses are kept.
struct MomSelectLayer {
  int64_t d;                // hidden size
  int64_t n;                // stored neurons
  const float* x_threshold; // (d,)
  const void* gate_up;      // (d, 2n) of weight_type, gate and up interleaved per neuron
  const void* down;         // (n, d) of weight_type
  const float* h_threshold; // (n,)
  int32_t weight_type;      // 0 float32, 1 bfloat16, 2 float16
  int32_t act;              // 0 silu, 1 gelu (tanh), 2 gelu (erf)
};

// The version of the entry points' signatures and of MomSelectLayer (cpu_native.py refuses another).
MOM_EXPORT int momcompress_cpu_ops_abi() { return 4; }

// OpenMP's thread count for the next parallel region of the calling thread: torch.get_num_threads() when the
// library shares torch's OpenMP runtime (tests check that it does).
MOM_EXPORT int momcompress_cpu_ops_omp_max_threads() { return omp_get_max_threads(); }

// h (T, n) = act(gu[:, 0::2]) * gu[:, 1::2] zeroed where |h| <= h_threshold, gu (T, 2n) f32 (the masked path's
// middle, one pass instead of torch's strided activation, product, comparison and product). Returns 0, or 1.
MOM_EXPORT int momcompress_select_hidden(const float* gu, int64_t T, int64_t n, const float* h_threshold, int act,
                                         float* h, int threads) {
  if (act < 0 || act > 2) {
    g_error = "unknown activation code (0 silu, 1 gelu_tanh, 2 gelu)";
    return 1;
  }
  if (threads <= 0) threads = omp_get_max_threads();
  const int64_t per = std::max<int64_t>(1, (T + threads - 1) / threads);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t0 = 0; t0 < T; t0 += per)
    hidden_thresholded(gu, t0, std::min(T, t0 + per), n, static_cast<Act>(act), h_threshold, h);
  return 0;
}

// ---------------------------------------------------------------------------- AMX, bf16 tables (amx_select.h)

// 1 when the AMX many-token path can run here (CPU features and the OS's permission), else 0.
MOM_EXPORT int momcompress_amx_usable() { return amx_usable() ? 1 : 0; }

// bf16 elements of a (K, N) table packed for the AMX path.
MOM_EXPORT int64_t momcompress_amx_packed_size(int64_t K, int64_t N) { return amx_packed_size(K, N); }

// Pack w (K, N) bf16 row-major into out (momcompress_amx_packed_size(K, N) bf16). Returns 0.
MOM_EXPORT int momcompress_amx_pack(const uint16_t* w, int64_t K, int64_t N, uint16_t* out, int threads) {
  if (threads <= 0) threads = omp_get_max_threads();
  const int64_t blocks = round_up(N, kAmxBlock) / 16;
#pragma omp parallel num_threads(threads)
  {
    const int64_t id = omp_get_thread_num(), all = omp_get_num_threads();
    amx_pack_blocks(w, K, N, out, blocks * id / all, blocks * (id + 1) / all);
  }
  return 0;
}

// A selector layer with bf16 tables packed by momcompress_amx_pack: gate_up (d, 2n) and down (n, d).
struct MomAmxLayer {
  int64_t d;
  int64_t n;
  const float* x_threshold;        // (d,)
  const uint16_t* gate_up_packed;  // amx_packed_size(d, 2n)
  const uint16_t* down_packed;     // amx_packed_size(n, d)
  const float* h_threshold;        // (n,)
  int32_t act;
  int32_t reserved;
};

#if MOM_HAVE_AMX
namespace {

// The four phases of amx_select.h on OpenMP's threads, one task per thread, a barrier between phases.
MOM_AMX_TARGET void select_ffn_amx(const MomAmxLayer& l, int64_t T, const float* x, float* out, int threads) {
  // Kept per calling thread between calls (no malloc per layer).
  thread_local std::vector<uint16_t> xparts, hparts;
  thread_local std::vector<float> gu, y;
  AmxJob job;
  job.T = T; job.d = l.d; job.n = l.n; job.tasks = threads;
  job.x = x; job.x_thr = l.x_threshold; job.h_thr = l.h_threshold;
  job.gate_up_packed = l.gate_up_packed; job.down_packed = l.down_packed; job.act = static_cast<Act>(l.act);
  amx_plan(job, xparts, hparts, gu, y);
#pragma omp parallel num_threads(threads)
  {
    const int64_t task = omp_get_thread_num();
    if (omp_get_num_threads() == threads) {
      amx_split_x(job, task);
#pragma omp barrier
      amx_gate_up(job, task);
#pragma omp barrier
      amx_hidden(job, task);
#pragma omp barrier
      amx_down(job, task);
    } else if (task == 0) {  // fewer threads than asked (nested region): one thread runs every task
      for (int64_t t = 0; t < threads; ++t) amx_split_x(job, t);
      for (int64_t t = 0; t < threads; ++t) amx_gate_up(job, t);
      for (int64_t t = 0; t < threads; ++t) amx_hidden(job, t);
      for (int64_t t = 0; t < threads; ++t) amx_down(job, t);
    }
  }
  amx_finish(job, out);
}

}  // namespace
#endif

namespace {
int select_ffn_amx_checked(const MomAmxLayer* layer, int64_t T, const float* x, float* out, int threads) {
  if (!amx_usable()) {
    g_error = "AMX (AMX-TILE, AMX-BF16, AVX512-BF16 and the OS's permission) is not usable on this machine";
    return 1;
  }
  if (layer->act < 0 || layer->act > 2) {
    g_error = "unknown activation code (0 silu, 1 gelu_tanh, 2 gelu)";
    return 1;
  }
  if (threads <= 0) threads = omp_get_max_threads();
  if (T <= 0) return 0;
#if MOM_HAVE_AMX
  select_ffn_amx(*layer, T, x, out, threads);
#endif
  return 0;
}
}  // namespace

// out (T, d) f32 = the layer on x (T, d) f32 by the AMX products (amx_select.h). Returns 0, or 1 with a message
// (AMX not usable here, bad layer, out of memory).
MOM_EXPORT int momcompress_select_ffn_amx(const MomAmxLayer* layer, int64_t T, const float* x, float* out,
                                          int threads) {
  return guarded([&] { return select_ffn_amx_checked(layer, T, x, out, threads); });
}

// The message of the calling thread's last failed call.
MOM_EXPORT const char* momcompress_cpu_ops_last_error() { return g_error.c_str(); }

// out (T, d) f32 = the layer on x (T, d) f32 (both contiguous). threads <= 0: OpenMP's default.
// Returns 0, or 1 with a message in momcompress_cpu_ops_last_error() (bad layer, out of memory).
MOM_EXPORT int momcompress_select_ffn_rows(const MomSelectLayer* layer, int64_t T, const float* x, float* out,
                                           int threads) {
  return guarded([&] {
    const MomSelectLayer& l = *layer;
    if (l.weight_type != kF32 && l.weight_type != kBF16 && l.weight_type != kF16) {
      g_error = "unknown weight type (0 float32, 1 bfloat16, 2 float16)";
      return 1;
    }
    if (l.act < 0 || l.act > 2) {
      g_error = "unknown activation code (0 silu, 1 gelu_tanh, 2 gelu)";
      return 1;
    }
    if (threads <= 0) threads = omp_get_max_threads();
    if (T <= 0 || l.n <= 0) {
      std::fill(out, out + (T > 0 ? T * l.d : 0), 0.0f);
      return 0;
    }
    // Kept per calling thread between calls: the lists and partials reuse their memory (no malloc per layer).
    thread_local SelectRows job;
    thread_local std::vector<float> gu, partial;
    job.T = T; job.d = l.d; job.n = l.n; job.h_thr = l.h_threshold; job.act = static_cast<Act>(l.act);
    job.gate_up = l.gate_up; job.down = l.down;
    gather_kept(x, l.x_threshold, job);
    plan_tasks(job, threads, gu, partial);
    if (l.weight_type == kF32) run<float>(job, threads);
    else if (l.weight_type == kBF16) run<bf16>(job, threads);
    else run<f16>(job, threads);
    sum_partials(job, out);
    return 0;
  });
}
