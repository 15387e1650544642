// The per-token selector FFN's row kernel, shared by the two compiled libraries that run it:
//   export/csrc/momcompress_ort_ops.cc  (onnxruntime's SelectFFN op, on onnxruntime's intra-op threads) and
//   momcompress/kernels/csrc/momcompress_cpu_ops.cc  (the PyTorch runtime, on torch's OpenMP threads).
//
// A layer (d channels, n stored neurons): x_s = x * (|x| > x_threshold); (g, u) = x_s @ gate_up (gate and up
// interleaved per neuron, gate_up (d, 2n)); h = act(g) * u; out = (h * (|h| > h_threshold)) @ down (down (n, d)).
// Each token reads only the gate_up rows of the channels it keeps and the down rows of the neurons it keeps,
// where they lie, in two phases that each split into independent tasks (no atomics):
//   (A) task a takes a 1/A share of every token's kept channels and adds their whole gate_up rows (2n values,
//       contiguous) into its own partial gu (T, 2n);
//   (B) task b takes a range of neurons, sums the A partials over it, applies act and the neuron threshold and
//       adds the kept neurons' rows of down into its own partial output (T, d).
// The caller runs A's tasks, then B's, then sum_partials. Arithmetic in fp32; tables float, bfloat16 or float16.

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


// The per-token rows: token t keeps channels kept[ptr[t] .. ptr[t+1]) with values val[...]. With more than one
// token (by_row), the same lists by channel too: channel j is kept by tokens ctok[cptr[j] .. cptr[j+1]) with
// values cval[...], and phase A's shares are ranges of channels, [share_lo[a], share_lo[a+1]).
struct SelectRows {
  int64_t T = 0, d = 0, n = 0;  // tokens, hidden size, stored neurons
  std::vector<int64_t> ptr;
  std::vector<int32_t> kept;
  std::vector<float> val;
  bool by_row = false;
  std::vector<int64_t> cptr;
  std::vector<int32_t> ctok;
  std::vector<float> cval;
  std::vector<int64_t> share_lo;
  const float* h_thr = nullptr;
  Act act = Act::Silu;
  const void* gate_up = nullptr;  // (d, 2n)
  const void* down = nullptr;     // (n, d)
  int64_t shares = 1;             // phase A tasks: shares of each token's kept channels
  int64_t ranges = 1;             // phase B tasks: ranges of neurons
  int64_t gstride = 0;            // floats from one token's gu partial to the next (2n, padded: see plan_tasks)
  float* gu_partial = nullptr;    // (shares, T, gstride)
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

// Two phases, each split for streaming: (A) task a takes a 1/A share of every token's kept channels and adds
// their whole gate_up rows (2F' values, contiguous) into its own gu partial (T, 2F'); (B) task b takes a range
// of neurons, sums the A partials over it, applies act and the neuron threshold, and adds the kept neurons'
// rows of down into its own output partial (T, d). The caller sums the B partials.
// One token (decode): each task streams its share of the token's rows, 4 rows per pass. More tokens (by_row):
// a row kept by several tokens is read once for all of them (task a takes a range of channels in A; B walks its
// neurons once), so a call reads the union of its tokens' rows, not the sum.
template <typename W>
MOM_INLINE void gate_up_rows_impl(const SelectRows& job, int64_t a) {
  const int64_t stride = 2 * job.n, T = job.T;
  const W* gu = static_cast<const W*>(job.gate_up);
  float* base = job.gu_partial + a * T * job.gstride;
  std::fill(base, base + T * job.gstride, 0.0f);
  thread_local std::vector<const W*> rows;  // the share's channels kept by some token: their gate_up rows
  thread_local std::vector<float> xu;       // (T, rows): the tokens' values on them, 0 where not kept
  thread_local std::vector<float*> accs;
  rows.clear();
  for (int64_t j = job.share_lo[a]; j < job.share_lo[a + 1]; ++j)
    if (job.cptr[j + 1] > job.cptr[j]) rows.push_back(gu + j * stride);
  const int64_t nr = static_cast<int64_t>(rows.size());
  xu.assign(static_cast<size_t>(T * nr), 0.0f);
  for (int64_t j = job.share_lo[a], k = 0; j < job.share_lo[a + 1]; ++j) {
    if (job.cptr[j + 1] == job.cptr[j]) continue;
    for (int64_t e = job.cptr[j]; e < job.cptr[j + 1]; ++e) xu[job.ctok[e] * nr + k] = job.cval[e];
    ++k;
  }
  accs.resize(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) accs[t] = base + t * job.gstride;
  // Columns in chunks: 4 row pieces and T accumulator pieces of `chunk` floats stay within about 32 KiB (L1).
  const int64_t chunk = std::max<int64_t>(256, std::min<int64_t>(stride, 8192 / (4 + T) / 16 * 16));
  for (int64_t c0 = 0; c0 < stride; c0 += chunk)
    union_rows_to_tokens<W>(rows.data(), nr, xu.data(), T, accs.data(), c0, std::min(chunk, stride - c0));
}

template <typename W>
MOM_INLINE void gate_up_share_impl(const SelectRows& job, int64_t a) {
  if (job.by_row) {
    gate_up_rows_impl<W>(job, a);
    return;
  }
  const int64_t stride = 2 * job.n;
  const W* gu = static_cast<const W*>(job.gate_up);
  for (int64_t t = 0; t < job.T; ++t) {
    float* acc = job.gu_partial + (a * job.T + t) * job.gstride;
    std::fill(acc, acc + stride, 0.0f);
    const int64_t nk = job.ptr[t + 1] - job.ptr[t];
    const int64_t p0 = job.ptr[t] + nk * a / job.shares, p1 = job.ptr[t] + nk * (a + 1) / job.shares;
    const int32_t* j = job.kept.data();
    const float* v = job.val.data();
    int64_t p = p0;
    for (; p + 8 <= p1; p += 4)
      acc_rows4_ahead<W>(acc, gu + j[p] * stride, gu + j[p + 1] * stride, gu + j[p + 2] * stride, gu + j[p + 3] * stride,
                         v[p], v[p + 1], v[p + 2], v[p + 3], stride, gu + j[p + 4] * stride, gu + j[p + 5] * stride,
                         gu + j[p + 6] * stride, gu + j[p + 7] * stride);
    for (; p + 4 <= p1; p += 4)
      acc_rows4<W>(acc, gu + j[p] * stride, gu + j[p + 1] * stride, gu + j[p + 2] * stride, gu + j[p + 3] * stride, v[p],
                   v[p + 1], v[p + 2], v[p + 3], stride);
    for (; p < p1; ++p) acc_row<W>(acc, gu + j[p] * stride, v[p], stride);
  }
}

// h (m,) of token t over neurons [lo, lo + m): the A partials summed, then act(g) * u.
MOM_INLINE void hidden_of_token(const SelectRows& job, int64_t t, int64_t lo, int64_t m, float* gu, float* h) {
  const int64_t stride = job.gstride;
  const float* first = job.gu_partial + t * stride + 2 * lo;
  std::copy(first, first + 2 * m, gu);
  for (int64_t a = 1; a < job.shares; ++a) {
    const float* part = job.gu_partial + (a * job.T + t) * stride + 2 * lo;
    for (int64_t q = 0; q < 2 * m; ++q) gu[q] += part[q];
  }
  activate_pairs(gu, m, job.act, h);
}

template <typename W>
MOM_INLINE void down_range_impl(const SelectRows& job, int64_t b) {
  const int64_t lo = job.n * b / job.ranges / 16 * 16, hi = b + 1 == job.ranges ? job.n : job.n * (b + 1) / job.ranges / 16 * 16;
  const int64_t m = hi - lo;
  const W* down = static_cast<const W*>(job.down);
  // Scratch kept per thread between calls (a decode step calls this once per layer and task: no malloc).
  thread_local std::vector<float> gu, h;
  thread_local std::vector<int64_t> kept;
  gu.resize(static_cast<size_t>(2 * m));
  h.resize(static_cast<size_t>(job.by_row ? job.T * m : m));
  kept.resize(static_cast<size_t>(m));
  if (job.by_row) {  // every token's h first, then the union of kept neurons' rows, each read once
    const int64_t T = job.T;
    for (int64_t t = 0; t < T; ++t) hidden_of_token(job, t, lo, m, gu.data(), h.data() + t * m);
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
    for (int64_t t = 0; t < T; ++t) accs[t] = job.partial + (b * T + t) * job.d;
    union_rows_to_tokens<W>(rows.data(), nu, hu.data(), T, accs.data(), 0, job.d);
    return;
  }
  for (int64_t t = 0; t < job.T; ++t) {
    hidden_of_token(job, t, lo, m, gu.data(), h.data());
    float* out = job.partial + (b * job.T + t) * job.d;
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

MOM_MULTIVERSION void gate_up_share(const SelectRows& job, int64_t a, const float*) { gate_up_share_impl<float>(job, a); }
MOM_MULTIVERSION void gate_up_share(const SelectRows& job, int64_t a, const bf16*) { gate_up_share_impl<bf16>(job, a); }
MOM_MULTIVERSION void gate_up_share(const SelectRows& job, int64_t a, const f16*) { gate_up_share_impl<f16>(job, a); }
MOM_MULTIVERSION void down_range(const SelectRows& job, int64_t b, const float*) { down_range_impl<float>(job, b); }
MOM_MULTIVERSION void down_range(const SelectRows& job, int64_t b, const bf16*) { down_range_impl<bf16>(job, b); }
MOM_MULTIVERSION void down_range(const SelectRows& job, int64_t b, const f16*) { down_range_impl<f16>(job, b); }

// The kept channels of x (T, d) f32: token t keeps channels kept[ptr[t] .. ptr[t+1]) with values val[...];
// with T > 1 also by channel (by_row, see SelectRows).
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
  job.cptr.assign(static_cast<size_t>(job.d + 1), 0);
  for (int32_t j : job.kept) ++job.cptr[j + 1];
  for (int64_t j = 0; j < job.d; ++j) job.cptr[j + 1] += job.cptr[j];
  job.ctok.resize(job.kept.size());
  job.cval.resize(job.kept.size());
  thread_local std::vector<int64_t> fill;
  fill.assign(job.cptr.begin(), job.cptr.end() - 1);
  for (int64_t t = 0; t < job.T; ++t) {
    for (int64_t p = job.ptr[t]; p < job.ptr[t + 1]; ++p) {
      const int64_t e = fill[job.kept[p]]++;
      job.ctok[e] = static_cast<int32_t>(t);
      job.cval[e] = job.val[p];
    }
  }
}

// Split the job into `tasks` shares (phase A) and up to `tasks` neuron ranges of >= 16 (phase B), with their
// partial buffers (kept by the caller).
inline void plan_tasks(SelectRows& job, int64_t tasks, std::vector<float>& gu_partial, std::vector<float>& partial) {
  job.shares = std::max<int64_t>(1, tasks);
  job.ranges = std::max<int64_t>(1, std::min<int64_t>(tasks, job.n / 16));
  if (job.by_row) {  // channel ranges with about equal numbers of kept rows (distinct rows: the bytes read)
    int64_t rows = 0;
    for (int64_t j = 0; j < job.d; ++j) rows += job.cptr[j + 1] > job.cptr[j];
    job.share_lo.assign(1, 0);
    int64_t seen = 0;
    for (int64_t j = 0; j < job.d && static_cast<int64_t>(job.share_lo.size()) < job.shares; ++j) {
      seen += job.cptr[j + 1] > job.cptr[j];
      if (seen * job.shares >= rows * static_cast<int64_t>(job.share_lo.size())) job.share_lo.push_back(j + 1);
    }
    while (static_cast<int64_t>(job.share_lo.size()) <= job.shares) job.share_lo.push_back(job.d);
    job.share_lo.back() = job.d;
  }
  // One token's gu partial to the next: 2n floats plus a cache line, so that the tokens' accumulators a row is
  // added into are not a multiple of 4 KiB apart (they would be for 2n = 3072: the CPU then takes each load for
  // one depending on the previous token's store, "4K aliasing", and the multi-token loop runs at half speed).
  job.gstride = 2 * job.n + 16;
  if ((job.gstride * 4) % 4096 == 0) job.gstride += 16;
  gu_partial.resize(static_cast<size_t>(job.shares * job.T * job.gstride));  // phase A overwrites it
  partial.assign(static_cast<size_t>(job.ranges * job.T * job.d), 0.0f);
  job.gu_partial = gu_partial.data();
  job.partial = partial.data();
}

// out (T, d) = the sum of phase B's partial outputs.
inline void sum_partials(const SelectRows& job, float* out) {
  const int64_t size = job.T * job.d;
  std::memcpy(out, job.partial, static_cast<size_t>(size) * 4);
  for (int64_t b = 1; b < job.ranges; ++b) {
    const float* part = job.partial + b * size;
    for (int64_t q = 0; q < size; ++q) out[q] += part[q];
  }
}

}  // namespace mom
