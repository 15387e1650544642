// The per-token selector FFN's row kernel, shared by the two compiled libraries that run it:
//   export/csrc/momcompress_ort_ops.cc  (onnxruntime's SelectFFN op, on onnxruntime's intra-op threads) and
//   momcompress/kernels/csrc/momcompress_cpu_ops.cc  (the PyTorch runtime, on torch's OpenMP threads).
//
// A layer (d channels, n stored neurons): x_s = x * (|x| > x_threshold); (g, u) = x_s @ gate_up (gate and up
// interleaved per neuron, gate_up (d, 2n)); h = act(g) * u; out = (h * (|h| > h_threshold)) @ down (down (n, d)).
// Each token reads only the gate_up rows of the channels it keeps and the down rows of the neurons it keeps,
// where they lie, in one parallel section of independent tasks (no atomics, no barrier): task b takes a range of
// neurons [lo, hi), (A) adds the kept channels' gate_up row pieces [2lo, 2hi) (contiguous) into gu's columns of
// those neurons, (B) applies act and the neuron threshold to them and adds the kept neurons' rows of down into its
// own partial output (T, d). The caller runs the tasks, then sum_partials. Arithmetic in fp32; tables float,
// bfloat16 or float16.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
// One build, the best code path for each CPU: AVX-512, AVX2+FMA+F16C, or baseline x86-64 (chosen at load).
#define MOM_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOM_MULTIVERSION
#endif
#define MOM_INLINE inline __attribute__((always_inline))

namespace mom {

// ---------------------------------------------------------------------------------------- numbers
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

MOM_INLINE float bits_to_f32(uint32_t w) { float f; std::memcpy(&f, &w, 4); return f; }
MOM_INLINE uint32_t f32_to_bits(float f) { uint32_t w; std::memcpy(&w, &f, 4); return w; }

MOM_INLINE float to_f32(float v) { return v; }
MOM_INLINE float to_f32(bf16 v) { return bits_to_f32(static_cast<uint32_t>(v.bits) << 16); }
// IEEE half -> float without branches (vectorises), after Marat Dukhan's FP16 library (MIT).
MOM_INLINE float to_f32(f16 v) {
  const uint32_t w = static_cast<uint32_t>(v.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = sign | (two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized));
  return bits_to_f32(result);
}

MOM_INLINE void from_f32(float v, float* out) { *out = v; }
MOM_INLINE void from_f32(float v, bf16* out) {  // round to nearest even
  uint32_t w = f32_to_bits(v);
  if ((w & 0x7FFFFFFFu) > 0x7F800000u) { out->bits = 0x7FC0; return; }
  w += 0x7FFFu + ((w >> 16) & 1u);
  out->bits = static_cast<uint16_t>(w >> 16);
}
MOM_INLINE void from_f32(float f, f16* out) {  // IEEE round to nearest even (FP16 library)
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  out->bits = static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

enum class Act { Silu = 0, GeluTanh = 1, Gelu = 2 };

MOM_INLINE float activate(float g, Act act) {
  switch (act) {
    case Act::Silu: return g / (1.0f + std::exp(-g));
    case Act::GeluTanh: return 0.5f * g * (1.0f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    default: return 0.5f * g * (1.0f + std::erf(g * 0.7071067811865476f));
  }
}

// exp without branches (vectorises), Cephes' expf polynomial with Cody-Waite reduction: relative error
// about 1e-7 on the clamped range [-87.3, 88.3] (beyond it, the clamp: exp saturates, silu's limits hold).
MOM_INLINE float vexp(float x) {
  x = x < -87.3365f ? -87.3365f : (x > 88.3762f ? 88.3762f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const uint32_t scale = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  return p * bits_to_f32(scale);
}

// h[i] = act(gu[2i]) * gu[2i + 1] for i < m (gate and up interleaved).
MOM_INLINE void activate_pairs(const float* __restrict gu, int64_t m, Act act, float* __restrict h) {
  switch (act) {
    case Act::Silu:
      for (int64_t i = 0; i < m; ++i) {
        const float g = gu[2 * i];
        h[i] = g / (1.0f + vexp(-g)) * gu[2 * i + 1];
      }
      break;
    case Act::GeluTanh:
      for (int64_t i = 0; i < m; ++i) {
        const float g = gu[2 * i];
        const float y = 0.7978845608028654f * (g + 0.044715f * g * g * g);
        const float t = 1.0f - 2.0f / (vexp(2.0f * y) + 1.0f);  // tanh(y)
        h[i] = 0.5f * g * (1.0f + t) * gu[2 * i + 1];
      }
      break;
    default:
      for (int64_t i = 0; i < m; ++i) h[i] = activate(gu[2 * i], act) * gu[2 * i + 1];
  }
}

// h = act(gu[:, 0::2]) * gu[:, 1::2], zeroed where |h| <= h_thr, for tokens [t0, t1) of gu (T, 2n) -> h (T, n),
// in one pass: the middle of a selector layer whose two products run as dense matmuls (many tokens).
MOM_MULTIVERSION void hidden_thresholded(const float* gu, int64_t t0, int64_t t1, int64_t n, Act act,
                                         const float* h_thr, float* h) {
  for (int64_t t = t0; t < t1; ++t) {
    float* dst = h + t * n;
    activate_pairs(gu + t * 2 * n, n, act, dst);
    for (int64_t i = 0; i < n; ++i) dst[i] = std::fabs(dst[i]) > h_thr[i] ? dst[i] : 0.0f;
  }
}

// acc[q] += sum_k xv[k] * rows[k][q] for q < n (4 rows per pass: acc is read and written once per 4 rows).
template <typename W>
MOM_INLINE void acc_rows4(float* __restrict acc, const W* __restrict r0, const W* __restrict r1, const W* __restrict r2,
                          const W* __restrict r3, float x0, float x1, float x2, float x3, int64_t n) {
  for (int64_t q = 0; q < n; ++q)
    acc[q] += x0 * to_f32(r0[q]) + x1 * to_f32(r1[q]) + x2 * to_f32(r2[q]) + x3 * to_f32(r3[q]);
}

// The same, prefetching the next 4 rows (p0..p3, the next pass's) line by line as this pass streams its own:
// the rows of kept channels are scattered, so the hardware prefetcher restarts at every row.
template <typename W>
MOM_INLINE void acc_rows4_ahead(float* __restrict acc, const W* __restrict r0, const W* __restrict r1,
                                const W* __restrict r2, const W* __restrict r3, float x0, float x1, float x2, float x3,
                                int64_t n, const W* p0, const W* p1, const W* p2, const W* p3) {
  constexpr int64_t kLine = 64 / sizeof(W);
  int64_t q0 = 0;
  for (; q0 + kLine <= n; q0 += kLine) {
    __builtin_prefetch(p0 + q0);
    __builtin_prefetch(p1 + q0);
    __builtin_prefetch(p2 + q0);
    __builtin_prefetch(p3 + q0);
    // (not unrolled: GCC would unroll this 16-trip loop into scalar code before vectorising it)
#pragma GCC unroll 1
    for (int64_t q = q0; q < q0 + kLine; ++q)
      acc[q] += x0 * to_f32(r0[q]) + x1 * to_f32(r1[q]) + x2 * to_f32(r2[q]) + x3 * to_f32(r3[q]);
  }
  for (int64_t q = q0; q < n; ++q)
    acc[q] += x0 * to_f32(r0[q]) + x1 * to_f32(r1[q]) + x2 * to_f32(r2[q]) + x3 * to_f32(r3[q]);
}

template <typename W>
MOM_INLINE void acc_row(float* __restrict acc, const W* __restrict r, float xv, int64_t n) {
  for (int64_t q = 0; q < n; ++q) acc[q] += xv * to_f32(r[q]);
}


// One call of the row kernel. Token t keeps channels kept[ptr[t] .. ptr[t+1]) with values val[...]; with more than
// one token (by_row), urows are the channels some token keeps and uxu (T, urows) their values (0 where a token does
// not keep one), so that a row kept by several tokens is read once for all of them.
struct SelectRows {
  int64_t T = 0, d = 0, n = 0;  // tokens, hidden size, stored neurons
  std::vector<int64_t> ptr;
  std::vector<int32_t> kept;
  std::vector<float> val;
  bool by_row = false;
  std::vector<int32_t> urows;
  std::vector<float> uxu;
  const float* h_thr = nullptr;
  Act act = Act::Silu;
  const void* gate_up = nullptr;  // (d, 2n)
  const void* down = nullptr;     // (n, d)
  int64_t ranges = 1;             // tasks: ranges of neurons
  int64_t gstride = 0;            // floats from one token's gu to the next (2n, padded: see plan_tasks)
  float* gu = nullptr;            // (T, gstride): each task writes its neurons' columns
  float* partial = nullptr;       // (ranges, T, d), zeroed
};

// For every token t: accs[t][c0 .. c0 + len) += sum_k xu[t * nr + k] * rows[k][c0 .. c0 + len), over the union
// rows (of all the tokens) in groups of 4. A group's 4 row pieces are read from memory once, by the first token
// that keeps one of them (which also prefetches the next group's), then from cache by the others; a token that
// keeps none of the 4 skips the group, a token that keeps some multiplies the others by 0. So a call reads the
// union of its tokens' rows, and the accumulators stay in cache when len is small enough (see the callers).
template <typename W>
MOM_INLINE void union_rows_to_tokens(const W* const* rows, int64_t nr, const float* xu, int64_t T, float* const* accs,
                                     int64_t c0, int64_t len) {
  for (int64_t k = 0; k < nr; k += 4) {
    const int64_t g = std::min<int64_t>(4, nr - k);
    const W* r[4];
    const W* p[4];
    for (int i = 0; i < 4; ++i) {
      r[i] = rows[k + std::min<int64_t>(i, g - 1)] + c0;  // a short last group repeats its last row, with x = 0
      p[i] = rows[std::min<int64_t>(k + 4 + i, nr - 1)] + c0;
    }
    bool first = true;
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = xu + t * nr + k;
      const float x0 = xt[0], x1 = g > 1 ? xt[1] : 0.0f, x2 = g > 2 ? xt[2] : 0.0f, x3 = g > 3 ? xt[3] : 0.0f;
      if (x0 == 0.0f && x1 == 0.0f && x2 == 0.0f && x3 == 0.0f) continue;
      if (first) {
        acc_rows4_ahead<W>(accs[t] + c0, r[0], r[1], r[2], r[3], x0, x1, x2, x3, len, p[0], p[1], p[2], p[3]);
        first = false;
      } else {
        acc_rows4<W>(accs[t] + c0, r[0], r[1], r[2], r[3], x0, x1, x2, x3, len);
      }
    }
  }
}

// h (m,) of token t over neurons [lo, lo + m): act(g) * u from the gu columns of those neurons.
MOM_INLINE void hidden_of_token(const SelectRows& job, int64_t t, int64_t lo, int64_t m, float* h) {
  activate_pairs(job.gu + t * job.gstride + 2 * lo, m, job.act, h);
}

// Task b's neurons [lo, hi): ranges of multiples of 16 (the last range takes the rest).
MOM_INLINE void neuron_range(const SelectRows& job, int64_t b, int64_t* lo, int64_t* hi) {
  *lo = job.n * b / job.ranges / 16 * 16;
  *hi = b + 1 == job.ranges ? job.n : job.n * (b + 1) / job.ranges / 16 * 16;
}

// (A) gu[:, 2lo .. 2hi) = the kept channels' values times their gate_up rows' pieces [2lo, 2hi) (contiguous), for
// every token: one token streams its kept rows' pieces 4 per pass, prefetching the next pass's; several tokens
// read each union row's piece once for all of them.
template <typename W>
MOM_INLINE void gate_up_columns(const SelectRows& job, int64_t lo, int64_t hi) {
  const int64_t stride = 2 * job.n, c0 = 2 * lo, len = 2 * (hi - lo), T = job.T;
  const W* gu = static_cast<const W*>(job.gate_up);
  for (int64_t t = 0; t < T; ++t) std::fill_n(job.gu + t * job.gstride + c0, len, 0.0f);
  if (!job.by_row) {
    float* acc = job.gu + c0;
    const int32_t* j = job.kept.data();
    const float* v = job.val.data();
    const W* g = gu + c0;
    const int64_t p1 = job.ptr[1];
    int64_t p = 0;
    for (; p + 8 <= p1; p += 4)
      acc_rows4_ahead<W>(acc, g + j[p] * stride, g + j[p + 1] * stride, g + j[p + 2] * stride, g + j[p + 3] * stride,
                         v[p], v[p + 1], v[p + 2], v[p + 3], len, g + j[p + 4] * stride, g + j[p + 5] * stride,
                         g + j[p + 6] * stride, g + j[p + 7] * stride);
    for (; p + 4 <= p1; p += 4)
      acc_rows4<W>(acc, g + j[p] * stride, g + j[p + 1] * stride, g + j[p + 2] * stride, g + j[p + 3] * stride, v[p],
                   v[p + 1], v[p + 2], v[p + 3], len);
    for (; p < p1; ++p) acc_row<W>(acc, g + j[p] * stride, v[p], len);
    return;
  }
  thread_local std::vector<const W*> rows;
  thread_local std::vector<float*> accs;
  const int64_t nr = static_cast<int64_t>(job.urows.size());
  rows.resize(static_cast<size_t>(nr));
  for (int64_t k = 0; k < nr; ++k) rows[k] = gu + static_cast<int64_t>(job.urows[k]) * stride;
  accs.resize(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) accs[t] = job.gu + t * job.gstride;
  // Columns in chunks: 4 row pieces and T accumulator pieces of `chunk` floats stay within about 32 KiB (L1).
  const int64_t chunk = std::max<int64_t>(256, std::min<int64_t>(len, 8192 / (4 + T) / 16 * 16));
  for (int64_t c = c0; c < c0 + len; c += chunk)
    union_rows_to_tokens<W>(rows.data(), nr, job.uxu.data(), T, accs.data(), c, std::min(chunk, c0 + len - c));
}

// (B) on neurons [lo, hi): h from gu, act and the neuron threshold, then the kept neurons' rows of down added into
// partial (T, d).
template <typename W>
MOM_INLINE void down_neurons(const SelectRows& job, int64_t lo, int64_t hi, float* partial) {
  const int64_t m = hi - lo;
  const W* down = static_cast<const W*>(job.down);
  // Scratch kept per thread between calls (a decode step calls this once per layer and task: no malloc).
  thread_local std::vector<float> h;
  thread_local std::vector<int64_t> kept;
  h.resize(static_cast<size_t>(job.by_row ? job.T * m : m));
  kept.resize(static_cast<size_t>(m));
  if (job.by_row) {  // every token's h first, then the union of kept neurons' rows, each read once
    const int64_t T = job.T;
    for (int64_t t = 0; t < T; ++t) hidden_of_token(job, t, lo, m, h.data() + t * m);
    thread_local std::vector<const W*> rows;
    thread_local std::vector<float> hu;  // (T, union): h where kept, else 0
    thread_local std::vector<float*> accs;
    int64_t nu = 0;
    for (int64_t i = 0; i < m; ++i) {
      const float thr = job.h_thr[lo + i];
      for (int64_t t = 0; t < T; ++t)
        if (std::fabs(h[t * m + i]) > thr) {
          kept[nu++] = i;
          break;
        }
    }
    rows.resize(static_cast<size_t>(nu));
    hu.resize(static_cast<size_t>(T * nu));
    for (int64_t k = 0; k < nu; ++k) {
      const int64_t i = kept[k];
      rows[k] = down + (lo + i) * job.d;
      const float thr = job.h_thr[lo + i];
      for (int64_t t = 0; t < T; ++t) {
        const float hv = h[t * m + i];
        hu[t * nu + k] = std::fabs(hv) > thr ? hv : 0.0f;
      }
    }
    accs.resize(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) accs[t] = partial + t * job.d;
    union_rows_to_tokens<W>(rows.data(), nu, hu.data(), T, accs.data(), 0, job.d);
    return;
  }
  for (int64_t t = 0; t < job.T; ++t) {
    hidden_of_token(job, t, lo, m, h.data());
    float* out = partial + t * job.d;
    int64_t nk = 0;
    for (int64_t i = 0; i < m; ++i)
      if (std::fabs(h[i]) > job.h_thr[lo + i]) kept[nk++] = i;
    // out += h[i] * down[lo + i] over the kept neurons, 4 rows per pass, prefetching the next pass's 4.
    const W* base = down + lo * job.d;
    const int64_t dd = job.d;
    const int64_t* kp = kept.data();
    const float* hv = h.data();
    int64_t k = 0;
    for (; k + 8 <= nk; k += 4)
      acc_rows4_ahead<W>(out, base + kp[k] * dd, base + kp[k + 1] * dd, base + kp[k + 2] * dd, base + kp[k + 3] * dd,
                         hv[kp[k]], hv[kp[k + 1]], hv[kp[k + 2]], hv[kp[k + 3]], dd, base + kp[k + 4] * dd,
                         base + kp[k + 5] * dd, base + kp[k + 6] * dd, base + kp[k + 7] * dd);
    for (; k + 4 <= nk; k += 4)
      acc_rows4<W>(out, base + kp[k] * dd, base + kp[k + 1] * dd, base + kp[k + 2] * dd, base + kp[k + 3] * dd,
                   hv[kp[k]], hv[kp[k + 1]], hv[kp[k + 2]], hv[kp[k + 3]], dd);
    for (; k < nk; ++k) acc_row<W>(out, base + kp[k] * dd, hv[kp[k]], dd);
  }
}

// Task b of a call, one parallel section in all: (A) then (B) on its own neurons, into its own output partial.
// Each task reads its pieces of the kept gate_up rows and its kept down rows, where they lie; no task waits for
// another (the two phases share neither rows nor columns), which matters where threads sleep between calls
// (onnxruntime without spinning: each extra synchronisation of a decode step's 30 small layers costs a wake-up).
template <typename W>
MOM_INLINE void range_task_impl(const SelectRows& job, int64_t b) {
  int64_t lo, hi;
  neuron_range(job, b, &lo, &hi);
  gate_up_columns<W>(job, lo, hi);
  down_neurons<W>(job, lo, hi, job.partial + b * job.T * job.d);
}

MOM_MULTIVERSION void select_range(const SelectRows& job, int64_t b, const float*) { range_task_impl<float>(job, b); }
MOM_MULTIVERSION void select_range(const SelectRows& job, int64_t b, const bf16*) { range_task_impl<bf16>(job, b); }
MOM_MULTIVERSION void select_range(const SelectRows& job, int64_t b, const f16*) { range_task_impl<f16>(job, b); }

// The kept channels of x (T, d) f32: token t keeps channels kept[ptr[t] .. ptr[t+1]) with values val[...];
// with T > 1 also their union (by_row, see SelectRows).
inline void gather_kept(const float* x, const float* x_thr, SelectRows& job) {
  job.ptr.assign(1, 0);
  job.kept.clear();
  job.val.clear();
  job.kept.reserve(static_cast<size_t>(job.T * job.d));
  job.val.reserve(static_cast<size_t>(job.T * job.d));
  for (int64_t t = 0; t < job.T; ++t) {
    const float* row = x + t * job.d;
    for (int64_t j = 0; j < job.d; ++j) {
      if (std::fabs(row[j]) > x_thr[j]) {
        job.kept.push_back(static_cast<int32_t>(j));
        job.val.push_back(row[j]);
      }
    }
    job.ptr.push_back(static_cast<int64_t>(job.kept.size()));
  }
  job.by_row = job.T > 1;
  if (!job.by_row) return;
  thread_local std::vector<int32_t> slot;  // channel -> its index in urows, or -1
  slot.assign(static_cast<size_t>(job.d), -1);
  job.urows.clear();
  for (int32_t j : job.kept) slot[j] = 0;
  for (int64_t j = 0; j < job.d; ++j)
    if (slot[j] == 0) {
      slot[j] = static_cast<int32_t>(job.urows.size());
      job.urows.push_back(static_cast<int32_t>(j));
    }
  const int64_t nr = static_cast<int64_t>(job.urows.size());
  job.uxu.assign(static_cast<size_t>(job.T * nr), 0.0f);
  for (int64_t t = 0; t < job.T; ++t)
    for (int64_t p = job.ptr[t]; p < job.ptr[t + 1]; ++p) job.uxu[t * nr + slot[job.kept[p]]] = job.val[p];
}

// Split the job into up to `tasks` neuron ranges of >= 16, with their buffers (kept by the caller).
inline void plan_tasks(SelectRows& job, int64_t tasks, std::vector<float>& gu, std::vector<float>& partial) {
  job.ranges = std::max<int64_t>(1, std::min<int64_t>(tasks, job.n / 16));
  // One token's gu to the next: 2n floats plus a cache line, so that the tokens' accumulators a row is added into
  // are not a multiple of 4 KiB apart (they would be for 2n = 3072: the CPU then takes each load for one depending
  // on the previous token's store, "4K aliasing", and the multi-token loop runs at half speed).
  job.gstride = 2 * job.n + 16;
  if ((job.gstride * 4) % 4096 == 0) job.gstride += 16;
  gu.resize(static_cast<size_t>(job.T * job.gstride));  // every task writes its columns
  partial.assign(static_cast<size_t>(job.ranges * job.T * job.d), 0.0f);
  job.gu = gu.data();
  job.partial = partial.data();
}

// out (T, d) = the sum of the tasks' partial outputs.
inline void sum_partials(const SelectRows& job, float* out) {
  const int64_t size = job.T * job.d;
  std::memcpy(out, job.partial, static_cast<size_t>(size) * 4);
  for (int64_t b = 1; b < job.ranges; ++b) {
    const float* part = job.partial + b * size;
    for (int64_t q = 0; q < size; ++q) out[q] += part[q];
  }
}

}  // namespace mom
