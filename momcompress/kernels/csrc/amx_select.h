// The per-token selector FFN's many-token path on Intel AMX, for bf16 tables in an fp32 model
// (`freeze --table-dtype bfloat16`), used by momcompress_cpu_ops.cc (the PyTorch runtime).
//
// With many tokens per call the union of the tokens' kept rows is nearly every row, so the layer runs as two
// dense products over masked inputs: gu = x_s @ gate_up, out = h_s @ down (select_rows.h has the formula).
// torch's CPU GEMMs have no fp32-activation x bf16-weight form (a bf16 GEMM rounds x, h and the product to
// bf16), so the masked path used to multiply fp32 copies of the tables. Here AMX multiplies the bf16 tables
// themselves and keeps fp32 accuracy on the activation side: each fp32 activation a is split into three bf16
// numbers, p0 = bf16(a), p1 = bf16(a - p0), p2 = bf16(a - p0 - p1), whose sum is a to a relative 2^-24 or better
// (8 significant bits each, each part's exponent at least 8 below the previous one's); the tables are exactly
// bf16, so every product p * w is exact in fp32, and AMX accumulates them in fp32 (TDPBF16PS). So a @ W =
// p0 @ W + p1 @ W + p2 @ W is computed to fp32 rounding with three bf16 tile products, nothing rounded to bf16
// (two parts leave a relative 2^-17, enough to flip a neuron threshold now and then that fp32 would not).
//
// Layout: a table W (K, N) (row k = input k) is packed once into AMX's B-tile form: for each block of 16 output
// columns, for each pair of input rows (2p, 2p + 1), the 16 columns' pairs (W[2p][c], W[2p + 1][c]): one tile
// (16 pairs x 16 columns, 1 KiB) per 32 inputs, a column block's whole K contiguous. K is padded to 32 and N to
// 32 with zeros. The activations are split into their three parts (rows padded to 32, K to 32) and the products run in
// blocks of 32 rows x 32 columns: 2 A tiles, 2 B tiles, 4 fp32 C tiles.
//
// Requires: x86-64, AMX-TILE + AMX-BF16 + AVX512-BF16 (Intel Sapphire Rapids and later), and the kernel's
// permission to use the tile data (arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16+): amx_usable() checks all.

#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "select_rows.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11 && defined(__linux__)
#define MOM_HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MOM_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")))
#else
#define MOM_HAVE_AMX 0
#endif

namespace mom {

constexpr int64_t kAmxBlock = 32;  // rows and columns per block of products; K steps of 32 bf16

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// bf16 elements of a (K, N) table packed for the B tiles.
inline int64_t amx_packed_size(int64_t K, int64_t N) { return round_up(K, kAmxBlock) * round_up(N, kAmxBlock); }

// Pack W (K, N) bf16 row-major into `out` (amx_packed_size elements), zero-padded. Columns [c0, c1) of 16-blocks
// (callers split the blocks between threads).
inline void amx_pack_blocks(const uint16_t* w, int64_t K, int64_t N, uint16_t* out, int64_t b0, int64_t b1) {
  const int64_t Kp = round_up(K, kAmxBlock);
  for (int64_t b = b0; b < b1; ++b) {
    uint16_t* dst = out + b * 16 * Kp;  // 16 columns x Kp inputs
    for (int64_t p = 0; p < Kp / 2; ++p) {
      for (int64_t c = 0; c < 16; ++c) {
        const int64_t col = b * 16 + c;
        const int64_t k0 = 2 * p, k1 = 2 * p + 1;
        dst[(p * 16 + c) * 2] = (col < N && k0 < K) ? w[k0 * N + col] : 0;
        dst[(p * 16 + c) * 2 + 1] = (col < N && k1 < K) ? w[k1 * N + col] : 0;
      }
    }
  }
}

#if MOM_HAVE_AMX

// Whether this CPU has AMX-TILE, AMX-BF16 and AVX512-BF16, and the OS lets this process use the tiles (asked
// once; the permission is the whole process's).
inline bool amx_usable() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u, avx512f = (b >> 16) & 1u;
    if (!(tile && bf16 && avx512f)) return false;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    if (!((a >> 5) & 1u)) return false;  // AVX512-BF16
    constexpr long kReqPerm = 0x1023, kGetPerm = 0x1022, kXTileData = 18;
    if (syscall(SYS_arch_prctl, kReqPerm, kXTileData) != 0) return false;
    unsigned long bitmask = 0;
    if (syscall(SYS_arch_prctl, kGetPerm, &bitmask) != 0) return false;
    return ((bitmask >> kXTileData) & 1ul) != 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

MOM_AMX_TARGET inline void amx_configure() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
}

MOM_AMX_TARGET inline void amx_release() { _tile_release(); }

// 16 fp32 -> three bf16 parts whose sum is v to a relative 2^-24 or better: p0 = bf16(v) (round to nearest
// even), p1 = bf16(v - p0), p2 = bf16(v - p0 - p1) (each difference is exact in fp32).
MOM_AMX_TARGET inline __m512 widen16(__m256bh b) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(b)), 16));
}

MOM_AMX_TARGET inline void split16(__m512 v, uint16_t* p0, uint16_t* p1, uint16_t* p2) {
  const __m256bh b0 = _mm512_cvtneps_pbh(v);
  v = _mm512_sub_ps(v, widen16(b0));
  const __m256bh b1 = _mm512_cvtneps_pbh(v);
  v = _mm512_sub_ps(v, widen16(b1));
  const __m256bh b2 = _mm512_cvtneps_pbh(v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p0), reinterpret_cast<const __m256i&>(b0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p1), reinterpret_cast<const __m256i&>(b1));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p2), reinterpret_cast<const __m256i&>(b2));
}

// A row of cols fp32 values, masked by |v| > thr (thr may be null: no mask), split into the three bf16 parts
// rows (Kp each: zeros past cols), parts[0] + r, parts[1] + r, parts[2] + r.
MOM_AMX_TARGET inline void split_row(const float* src, int64_t cols, const float* thr, uint16_t* const* parts, int64_t r,
                                     int64_t Kp) {
  uint16_t *p0 = parts[0] + r, *p1 = parts[1] + r, *p2 = parts[2] + r;
  int64_t j = 0;
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (; j + 16 <= cols; j += 16) {
    __m512 v = _mm512_loadu_ps(src + j);
    if (thr) {
      const __mmask16 keep = _mm512_cmp_ps_mask(_mm512_and_ps(v, sign), _mm512_loadu_ps(thr + j), _CMP_GT_OQ);
      v = _mm512_maskz_mov_ps(keep, v);
    }
    split16(v, p0 + j, p1 + j, p2 + j);
  }
  if (j < Kp) {
    alignas(64) float tail[16];
    for (; j < Kp; j += 16) {
      for (int q = 0; q < 16; ++q) {
        const int64_t c = j + q;
        tail[q] = c < cols && (!thr || std::fabs(src[c]) > thr[c]) ? src[c] : 0.0f;
      }
      split16(_mm512_load_ps(tail), p0 + j, p1 + j, p2 + j);
    }
  }
}

// C (Mp, ldc) fp32 columns [32 * nb0, 32 * nb1) = (A0 + A1 + A2) (Mp, Kp) @ B (Kp, .) packed, the A parts bf16
// (Mp, Kp) each, for all Mp / 32 row blocks: each B tile loaded is used by the 2 row tiles of all three parts.
MOM_AMX_TARGET inline void amx_gemm_columns(const uint16_t* const* parts, int64_t Mp, int64_t Kp,
                                            const uint16_t* packed, float* C, int64_t ldc, int64_t nb0, int64_t nb1) {
  const int64_t a_stride = Kp * 2;  // bytes
  const int64_t c_stride = ldc * 4;
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const uint16_t* b0 = packed + (2 * nb) * 16 * Kp;
    const uint16_t* b1 = b0 + 16 * Kp;
    for (int64_t m = 0; m < Mp; m += kAmxBlock) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < Kp; k += kAmxBlock) {
        _tile_loadd(6, b0 + k * 16, 64);
        _tile_loadd(7, b1 + k * 16, 64);
        for (int part = 0; part < 3; ++part) {
          const uint16_t* a = parts[part] + m * Kp + k;
          _tile_loadd(4, a, a_stride);
          _tile_loadd(5, a + 16 * Kp, a_stride);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      float* c = C + m * ldc + nb * kAmxBlock;
      _tile_stored(0, c, c_stride);
      _tile_stored(1, c + 16, c_stride);
      _tile_stored(2, c + 16 * ldc, c_stride);
      _tile_stored(3, c + 16 * ldc + 16, c_stride);
    }
  }
}

// One layer's call on the AMX path, split into four phases of independent tasks (the caller runs each phase's
// `tasks` tasks, on any threads, before the next phase): split x (rows), gu = x_s @ gate_up (column blocks),
// h = act, threshold and split (rows), y = h_s @ down (column blocks); then copies y's T rows out.
struct AmxJob {
  int64_t T = 0, d = 0, n = 0, tasks = 1;
  int64_t Mp = 0, Kd = 0, Kn = 0, Ngu = 0, Nd = 0;
  const float* x = nullptr;  // (T, d)
  const float* x_thr = nullptr;
  const float* h_thr = nullptr;
  const uint16_t* gate_up_packed = nullptr;  // amx_packed_size(d, 2n)
  const uint16_t* down_packed = nullptr;     // amx_packed_size(n, d)
  Act act = Act::Silu;
  uint16_t* xp[3] = {};  // x_s's parts (Mp, Kd)
  uint16_t* hp[3] = {};  // h_s's parts (Mp, Kn)
  float* gu = nullptr;   // (Mp, Ngu)
  float* y = nullptr;    // (Mp, Nd)
};

// Sizes and scratch for a call of T tokens (buffers kept by the caller, resized here).
inline void amx_plan(AmxJob& job, std::vector<uint16_t>& xparts, std::vector<uint16_t>& hparts, std::vector<float>& gu,
                     std::vector<float>& y) {
  job.Mp = round_up(job.T, kAmxBlock);
  job.Kd = round_up(job.d, kAmxBlock);
  job.Kn = round_up(job.n, kAmxBlock);
  job.Ngu = round_up(2 * job.n, kAmxBlock);
  job.Nd = round_up(job.d, kAmxBlock);
  xparts.resize(static_cast<size_t>(3 * job.Mp * job.Kd));
  hparts.resize(static_cast<size_t>(3 * job.Mp * job.Kn));
  gu.resize(static_cast<size_t>(job.Mp * job.Ngu));
  y.resize(static_cast<size_t>(job.Mp * job.Nd));
  for (int i = 0; i < 3; ++i) {
    job.xp[i] = xparts.data() + i * job.Mp * job.Kd;
    job.hp[i] = hparts.data() + i * job.Mp * job.Kn;
  }
  job.gu = gu.data();
  job.y = y.data();
}

inline void amx_share(int64_t count, int64_t task, int64_t tasks, int64_t& lo, int64_t& hi) {
  lo = count * task / tasks;
  hi = count * (task + 1) / tasks;
}

// Phase 1, task t: x_s = x * (|x| > x_threshold) split, for a share of the Mp rows (rows past T: zeros).
MOM_AMX_TARGET inline void amx_split_x(const AmxJob& job, int64_t task) {
  int64_t r0, r1;
  amx_share(job.Mp, task, job.tasks, r0, r1);
  for (int64_t r = r0; r < r1; ++r) {
    if (r < job.T) {
      split_row(job.x + r * job.d, job.d, job.x_thr, job.xp, r * job.Kd, job.Kd);
    } else {
      for (auto* p : job.xp) std::memset(p + r * job.Kd, 0, static_cast<size_t>(job.Kd) * 2);
    }
  }
}

// The block-column loop of one product over a share of the column blocks, rows in chunks of 128 so that a chunk
// of the A parts and the task's packed columns stay in L2 together.
MOM_AMX_TARGET inline void amx_product(uint16_t* const* parts, int64_t Mp, int64_t Kp, const uint16_t* packed,
                                       float* C, int64_t Np, int64_t task, int64_t tasks) {
  int64_t nb0, nb1;
  amx_share(Np / kAmxBlock, task, tasks, nb0, nb1);
  if (nb0 == nb1) return;
  amx_configure();
  for (int64_t mc = 0; mc < Mp; mc += 128) {
    const uint16_t* chunk[3] = {parts[0] + mc * Kp, parts[1] + mc * Kp, parts[2] + mc * Kp};
    amx_gemm_columns(chunk, std::min<int64_t>(128, Mp - mc), Kp, packed, C + mc * Np, Np, nb0, nb1);
  }
  amx_release();
}

// Phase 2: gu = x_s @ gate_up.
MOM_AMX_TARGET inline void amx_gate_up(const AmxJob& job, int64_t task) {
  amx_product(job.xp, job.Mp, job.Kd, job.gate_up_packed, job.gu, job.Ngu, task, job.tasks);
}

// Phase 3: h = act(g) * u, thresholded by |h| > h_threshold, split, for a share of the rows.
MOM_AMX_TARGET inline void amx_hidden(const AmxJob& job, int64_t task) {
  thread_local std::vector<float> h;
  h.resize(static_cast<size_t>(job.n));
  int64_t r0, r1;
  amx_share(job.Mp, task, job.tasks, r0, r1);
  for (int64_t r = r0; r < r1; ++r) {
    if (r < job.T) {
      activate_pairs(job.gu + r * job.Ngu, job.n, job.act, h.data());
      split_row(h.data(), job.n, job.h_thr, job.hp, r * job.Kn, job.Kn);
    } else {
      for (auto* p : job.hp) std::memset(p + r * job.Kn, 0, static_cast<size_t>(job.Kn) * 2);
    }
  }
}

// Phase 4: y = h_s @ down.
MOM_AMX_TARGET inline void amx_down(const AmxJob& job, int64_t task) {
  amx_product(job.hp, job.Mp, job.Kn, job.down_packed, job.y, job.Nd, task, job.tasks);
}

// out (T, d) = y's first T rows.
inline void amx_finish(const AmxJob& job, float* out) {
  for (int64_t r = 0; r < job.T; ++r) std::memcpy(out + r * job.d, job.y + r * job.Nd, static_cast<size_t>(job.d) * 4);
}

#else

inline bool amx_usable() { return false; }

#endif  // MOM_HAVE_AMX

}  // namespace mom
