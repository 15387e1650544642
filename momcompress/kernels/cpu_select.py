"""The per-token selector FFN on CPU for few tokens, reading only the kept rows where they lie (Numba).

The compiled kernel (cpu_native.py) does the same reads and is the first choice; this one runs where no C++
compiler is there to build it. FrozenSelectFFN's auto path measures which one, and up to how many tokens.

The masked path of `FrozenSelectFFN` multiplies every row (a dense matmul over masked inputs). This
kernel, compiled by Numba (optional: `pip install 'momcompress[cpu]'`), reads for each token only
  1. the rows of gate_up (d, 2F') of the channels it keeps (|x_j| > x_threshold[j]), over a chunk of
     neurons at a time: the chunk's interleaved gate and up weights are contiguous in each row;
  2. then, in the same chunk, h_i = act(g_i) * u_i, and the rows of down (F', d) of the neurons it
     keeps (|h_i| > h_threshold[i]), accumulated into the chunk's own partial output;
  3. out = the sum of the chunks' partial outputs (chunks x T x d floats: small).
Chunks run in parallel (Numba's threads, as many as torch uses); no atomics. fp32 only (Numba has no
bf16). The result equals `kernels.reference.select_ffn_reference` up to fp32 summation order.

    from momcompress.kernels import cpu_select
    if cpu_select.runs_on(x, gate_up):
        y = cpu_select.select_ffn_rows(x, x_threshold, gate_up, down, h_threshold, "silu")
"""

from __future__ import annotations

import functools
import os

import torch

from momcompress.kernels.cpu_fused import ACTIVATION_CODES, _numba

# Neurons per chunk: the chunk's slice of a gate_up row (2 x CHUNK floats) stays in cache across a
# call's tokens, and a 1536-neuron layer gives 8 chunks for 2 threads to balance.
CHUNK_NEURONS = 192
PARALLEL = os.environ.get("MOMCOMPRESS_CPU_FUSED_PARALLEL", "1") != "0"


def available() -> bool:
    return _numba() is not None


def runs_on(x: torch.Tensor, gate_up: torch.Tensor) -> bool:
    """Whether the kernel can run on x (T, d) with these weights: CPU, fp32, contiguous, no autograd, Numba."""
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and gate_up.dtype == torch.float32 and available()
        and not (torch.is_grad_enabled() and x.requires_grad) and gate_up.is_contiguous()
    )


@functools.cache
def _kernel(parallel: bool):
    """Compile (first use; cached on disk by Numba) and return the kernel, multi-threaded or not."""
    numba = _numba()
    import math

    import numpy as np

    @numba.njit(inline="always", fastmath=True)
    def act(g, code):
        if code == 0:
            return g / (1.0 + math.exp(-g))
        if code == 1:
            return 0.5 * g * (1.0 + math.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
        return 0.5 * g * (1.0 + math.erf(g * 0.7071067811865476))

    @numba.njit(parallel=parallel, fastmath=True, cache=True, nogil=True)
    def select_rows(x, x_thr, gate_up, down, h_thr, code, chunk, out):
        # x (T, d) f32; x_thr (d,) f32; gate_up (d, 2n) f32 interleaved; down (n, d) f32; h_thr (n,) f32;
        # out (T, d) f32, overwritten.
        T, d = x.shape
        n = down.shape[0]
        kept = np.empty((T, d), np.int64)  # kept channels per token
        nk = np.zeros(T, np.int64)
        for t in range(T):
            c = 0
            for j in range(d):
                if abs(x[t, j]) > x_thr[j]:
                    kept[t, c] = j
                    c += 1
            nk[t] = c
        chunks = max(1, (n + chunk - 1) // chunk)
        partial = np.zeros((chunks, T, d), np.float32)
        for c in numba.prange(chunks):
            lo = c * chunk
            hi = min(n, lo + chunk)
            m = hi - lo
            acc = np.empty(2 * m, np.float32)
            for t in range(T):
                acc[:] = 0.0
                for p in range(nk[t]):
                    j = kept[t, p]
                    xv = x[t, j]
                    row = gate_up[j, 2 * lo : 2 * hi]
                    for q in range(2 * m):
                        acc[q] += xv * row[q]
                for i in range(m):
                    h = act(acc[2 * i], code) * acc[2 * i + 1]
                    if abs(h) > h_thr[lo + i]:
                        for q in range(d):
                            partial[c, t, q] += h * down[lo + i, q]
        for t in range(T):
            for q in range(d):
                s = np.float32(0.0)
                for c in range(chunks):
                    s += partial[c, t, q]
                out[t, q] = s

    return select_rows


def select_ffn_rows(x, x_threshold, gate_up, down, h_threshold, activation: str) -> torch.Tensor:
    """The selector FFN on x (T, d) (CPU, fp32, few tokens): (T, d).

    Args:
        x: (T, d) fp32. x_threshold: (d,) fp32. gate_up: (d, 2F') fp32 contiguous, interleaved gate/up.
        down: (F', d) fp32 contiguous. h_threshold: (F',) fp32. activation: "silu", "gelu_tanh" or "gelu".
    """
    if gate_up.dtype != torch.float32 or down.dtype != torch.float32:
        raise TypeError(f"the fused (Numba) selector kernel takes fp32 tables, got {gate_up.dtype}: run the compiled row "
                        "kernel (path native, `momcompress build-ops`) or the masked path for 16-bit tables")
    numba = _numba()
    if numba is None:
        raise ImportError("the fused CPU path needs Numba: pip install 'momcompress[cpu]'")
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)) if PARALLEL else 1
    if PARALLEL and numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    out = torch.empty_like(x)
    _kernel(PARALLEL)(
        x.detach().contiguous().numpy(), x_threshold.detach().float().numpy(), gate_up.detach().numpy(),
        down.detach().contiguous().numpy(), h_threshold.detach().float().numpy(), ACTIVATION_CODES[activation],
        CHUNK_NEURONS, out.numpy(),
    )
    return out
