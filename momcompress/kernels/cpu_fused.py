"""The routed experts on CPU for few tokens, fused and reading the selected neuron rows where they lie.

The torch reference gathers (copies) the selected rows before multiplying them: the routed bytes are read,
written and read again, which on a CPU made the frozen FFN slower than dense (issue 13). This kernel,
compiled by Numba (an optional dependency: `pip install 'momcompress[cpu]'`), does in one call, for T
tokens (T small: decode):
  1. w[t, r] = sum_j top_w[t, j] * z[top_i[t, j], r] from the experts' block lists (CSR), and the union
     of the tokens' blocks;
  2. over chunks of the union's neuron rows (four rows at a time): for each row n of block r,
     h[t] = act(Wg[n] . x[t]) * (Wu[n] . x[t]) * w[t, r], then out_chunk[t] += h[t] * Wd[n] (Wd stored
     transposed: row n is W_down[:, n]); each row of the three matrices is read from memory once,
     contiguously, for all T tokens;
  3. out += sum of the per-chunk partial outputs (chunks x T x d floats: small).
No d-wide atomic adds: each chunk owns its partial output. fp32 only (Numba has no bf16); any block
size b (rows are rows: b = 1 is single neurons).

    from momcompress.kernels import cpu_fused
    if cpu_fused.available():
        cpu_fused.routed_experts_rows(x, top_w, top_i, offsets, blocks, scales, gate, up, down, "silu", out)

The result equals momcompress.kernels.reference.routed_experts_decode up to fp32 summation order.
"""

from __future__ import annotations

import functools
import math
import os

import torch

# Activation name -> the code the kernel branches on (the same codes as the Triton kernels).
ACTIVATION_CODES = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
# Chunks per thread: a little over-decomposition balances chunks whose tokens read different blocks.
CHUNKS_PER_THREAD = 2
# Run the kernel on Numba's thread pool, as many threads as torch uses (False: on the calling thread).
# Numba's pool is not torch's OpenMP pool, and right after a torch op torch's threads still spin; on a
# loaded 2-core machine parallel calls were erratic (5-180 ms instead of 0.1-0.8 ms), but run alone the
# parallel kernel made the decode step 0.79x dense against 0.87-0.89x on one thread (README).
# MOMCOMPRESS_CPU_FUSED_PARALLEL=0 runs it on the calling thread.
PARALLEL = os.environ.get("MOMCOMPRESS_CPU_FUSED_PARALLEL", "1") != "0"


@functools.cache
def _numba():
    try:
        import numba
    except ImportError:
        return None
    return numba


def available() -> bool:
    """True when Numba is installed (the fused CPU path can run)."""
    return _numba() is not None


@functools.cache
def _kernel(parallel: bool):
    """Compile (first use; cached on disk by Numba) and return the fused kernel, multi-threaded or not."""
    numba = _numba()
    import numpy as np

    @numba.njit(inline="always", fastmath=True)
    def act(g, code):
        if code == 0:
            return g / (1.0 + math.exp(-g))
        if code == 1:
            return 0.5 * g * (1.0 + math.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
        return 0.5 * g * (1.0 + math.erf(g * 0.7071067811865476))

    @numba.njit(parallel=parallel, fastmath=True, cache=True, nogil=True)
    def routed_rows(x, top_w, top_i, offsets, blocks, scales, gate, up, down, b, code, nchunks, out):
        # x (T, d) f32; top_w (T, k) f32; top_i (T, k) i64; offsets (E+1,), blocks (nnz,) i64, scales (nnz,) f32;
        # gate, up, down (R*b, d) f32 neuron rows; out (T, d) f32, added into.
        T, d = x.shape
        k = top_i.shape[1]
        R = gate.shape[0] // b
        w = np.zeros((T, R), np.float32)  # (T, R) block weight per token
        used = np.zeros(R, np.bool_)
        for t in range(T):
            for j in range(k):
                e = top_i[t, j]
                tw = top_w[t, j]
                for p in range(offsets[e], offsets[e + 1]):
                    r = blocks[p]
                    w[t, r] += tw * scales[p]
                    used[r] = True
        union = np.nonzero(used)[0]  # (K,) blocks some token reads
        K = union.shape[0]
        nrows = K * b
        rows = np.empty(nrows, np.int64)  # (K*b,) the union's neuron rows
        rblk = np.empty(nrows, np.int64)  # (K*b,) the block of each
        for i in range(K):
            for j in range(b):
                rows[i * b + j] = union[i] * b + j
                rblk[i * b + j] = union[i]
        chunks = max(1, min(nchunks, nrows))
        per = (nrows + chunks - 1) // chunks
        partial = np.zeros((chunks, T, d), np.float32)
        for c in numba.prange(chunks):
            lo = c * per
            hi = min(nrows, lo + per)
            i = lo
            # Four rows at a time: eight gate/up streams in flight keep the memory system busy when the rows
            # are scattered (b = 1), where one row at a time left the prefetchers restarting every 2 KB.
            while i + 4 <= hi:
                n0, n1, n2, n3 = rows[i], rows[i + 1], rows[i + 2], rows[i + 3]
                for t in range(T):
                    g0 = g1 = g2 = g3 = u0 = u1 = u2 = u3 = np.float32(0.0)
                    for q in range(d):
                        xq = x[t, q]
                        g0 += gate[n0, q] * xq
                        g1 += gate[n1, q] * xq
                        g2 += gate[n2, q] * xq
                        g3 += gate[n3, q] * xq
                        u0 += up[n0, q] * xq
                        u1 += up[n1, q] * xq
                        u2 += up[n2, q] * xq
                        u3 += up[n3, q] * xq
                    h0 = act(g0, code) * u0 * w[t, rblk[i]]
                    h1 = act(g1, code) * u1 * w[t, rblk[i + 1]]
                    h2 = act(g2, code) * u2 * w[t, rblk[i + 2]]
                    h3 = act(g3, code) * u3 * w[t, rblk[i + 3]]
                    for q in range(d):
                        partial[c, t, q] += h0 * down[n0, q] + h1 * down[n1, q] + h2 * down[n2, q] + h3 * down[n3, q]
                i += 4
            while i < hi:
                n = rows[i]
                for t in range(T):
                    g = np.float32(0.0)
                    u = np.float32(0.0)
                    for q in range(d):
                        g += gate[n, q] * x[t, q]
                        u += up[n, q] * x[t, q]
                    ht = act(g, code) * u * w[t, rblk[i]]
                    for q in range(d):
                        partial[c, t, q] += ht * down[n, q]
                i += 1
        for c in range(chunks):
            for t in range(T):
                for q in range(d):
                    out[t, q] += partial[c, t, q]

    return routed_rows


def routed_experts_rows(x, top_w, top_i, offsets, blocks, scales, routed_gate, routed_up, routed_down, activation: str, out) -> None:
    """Add the routed experts' output to out, in place (CPU, fp32, few tokens).

    Args:
        x: (T, d) fp32. top_w: (T, k) renormalised router weights. top_i: (T, k) expert ids.
        offsets: (E+1,) int64; expert e owns blocks[offsets[e]:offsets[e+1]] with gate values scales[...].
        blocks: (nnz,) int64 routed block ids. scales: (nnz,) fp32.
        routed_gate, routed_up, routed_down: (R, b, d) fp32 contiguous (down transposed).
        activation: "silu", "gelu_tanh" or "gelu".
        out: (T, d) fp32 contiguous, accumulated into.
    """
    numba = _numba()
    if numba is None:
        raise ImportError("the fused CPU path needs Numba: pip install 'momcompress[cpu]'")
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)) if PARALLEL else 1
    if PARALLEL and numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    R, b, d = routed_gate.shape
    rows = [t.detach().reshape(R * b, d).numpy() for t in (routed_gate, routed_up, routed_down)]  # (R*b, d) views
    _kernel(PARALLEL)(
        x.detach().numpy(), top_w.detach().float().numpy(), top_i.detach().to(torch.int64).numpy(),
        offsets.numpy(), blocks.numpy(), scales.float().numpy(), *rows, b, ACTIVATION_CODES[activation],
        threads * CHUNKS_PER_THREAD, out.detach().numpy(),
    )
