"""The single fused Triton kernel that TensorRT's ahead-of-time plugin embeds (plugins/mom_experts.py).

A TensorRT AOT plugin launches one kernel with the node's input and output pointers and a few scalar
arguments, with no workspace and an uninitialised output. So unlike momcompress.kernels.triton_mom (a
plan kernel, h in a buffer, a split reduction), this kernel does all of MoMExperts in one launch, with
no atomics:
- one program per (token t, tile of BLOCK_D output features): programs run in parallel over tokens and
  output tiles;
- each program walks the routed neuron rows in tiles of BLOCK_N rows (any block size b: row n belongs
  to block n // b), in parallel across the rows of a tile: it computes the tile's weights
  w[t, n // b] = sum_j top_w[t, j] * z[top_i[t, j], n // b] as a vector, skips a tile in which no row is
  used without reading it, loads only the used rows (masked loads), computes their gate/up over all of
  d and adds their down projection to its output tile; then out = accumulate + routed.
The price of having no workspace: the d / BLOCK_D programs of a token each compute the token's h (its
gate/up rows are read once per output tile, mostly from L2). A cross-program split over rows would need
a workspace or an output aliased to `accumulate` to reduce into; the JIT implementation (triton_mom's
decode kernels) has that split reduction.

Tested on CPU against the torch reference with TRITON_INTERPRET=1 (tests/test_kernels.py). Imports
triton at import time: import it lazily (mom_experts.py does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The activation codes and the activation itself are the kernels' own (momcompress.kernels.triton_mom).
from momcompress.kernels.triton_mom import ACTIVATION_CODES  # noqa: E402
from momcompress.kernels.triton_mom import _activation as _act  # noqa: E402


@triton.jit
def mom_experts_kernel(
    x_ptr, top_w_ptr, top_i_ptr, gate_ptr, up_ptr, down_ptr, scale_ptr, acc_ptr, out_ptr,
    R, d,
    K: tl.constexpr, B: tl.constexpr, ACT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (t, q): out[t, q*BLOCK_D : (q+1)*BLOCK_D] = accumulate + routed experts of token t."""
    t = tl.program_id(0)
    q = tl.program_id(1)
    cols = q * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) output features of this program
    cmask = cols < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(0, R * B, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) neuron rows of this tile
        nmask = n < R * B
        blk = n // B
        w = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(K):
            e = tl.load(top_i_ptr + t * K + j)
            wj = tl.load(top_w_ptr + t * K + j).to(tl.float32)
            w += wj * tl.load(scale_ptr + e * R + blk, mask=nmask, other=0.0).to(tl.float32)
        on = w != 0.0  # (BLOCK_N,) rows a selected expert uses
        if tl.max(on.to(tl.int32), axis=0) > 0:  # tiles no selected expert uses are never read
            row = n.to(tl.int64) * d  # (BLOCK_N,) weight row offsets
            hg = tl.zeros([BLOCK_N], dtype=tl.float32)
            hu = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(0, d, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                kmask = ks < d
                xv = tl.load(x_ptr + t * d + ks, mask=kmask, other=0.0).to(tl.float32)
                m2 = on[:, None] & kmask[None, :]
                wg = tl.load(gate_ptr + row[:, None] + ks[None, :], mask=m2, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_K)
                wu = tl.load(up_ptr + row[:, None] + ks[None, :], mask=m2, other=0.0).to(tl.float32)
                hg += tl.sum(wg * xv[None, :], axis=1)
                hu += tl.sum(wu * xv[None, :], axis=1)
            h = _act(hg, ACT) * hu * w  # (BLOCK_N,); 0 on unused rows
            wd = tl.load(down_ptr + row[:, None] + cols[None, :], mask=on[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(h[:, None] * wd, axis=0)  # (BLOCK_D,)
    prev = tl.load(acc_ptr + t * d + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * d + cols, (acc + prev).to(out_ptr.dtype.element_ty), mask=cmask)


def tiles(d: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_K, BLOCK_N) for hidden size d: output tiles of up to 256 features (d / 256 programs
    per token), 128-wide reductions over tiles of 16 neuron rows (2048 weights per load)."""
    return min(triton.next_power_of_2(d), 256), min(triton.next_power_of_2(d), 128), 16


def check_shapes(gate_shape, up_shape, down_shape, hidden: int | None = None) -> tuple[int, int, int]:
    """(R, b, d) of the routed weights, or ValueError: three (R, b, d) tensors with b >= 1 (and d = hidden if given).

    Any block size works (the kernel walks neuron rows); the guard catches weights that are not the
    routed-block layout (a transposed or padded export) before a kernel reads out of bounds."""
    shapes = [tuple(int(v) for v in s) for s in (gate_shape, up_shape, down_shape)]
    if any(len(s) != 3 for s in shapes) or len(set(shapes)) != 1:
        raise ValueError(f"routed gate/up/down must be three (R, b, d) tensors of one shape, got {shapes}")
    R, b, d = shapes[0]
    if b < 1 or (hidden is not None and d != hidden):
        raise ValueError(f"routed blocks of shape {shapes[0]} do not fit hidden size {hidden} (need b >= 1 and d = {hidden})")
    return R, b, d


def mom_experts(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, accumulate, activation: str) -> torch.Tensor:
    """Launch the kernel on torch tensors (the contract of export/op.py's MoMExperts): (T, d)."""
    T, d = x.shape
    R, b, _ = check_shapes(routed_gate.shape, routed_up.shape, routed_down.shape, d)
    out = torch.empty_like(x)
    block_d, block_k, block_n = tiles(d)
    grid = (T, triton.cdiv(d, block_d))
    mom_experts_kernel[grid](
        x.contiguous(), top_w.float().contiguous(), top_i.contiguous(), routed_gate.contiguous(), routed_up.contiguous(),
        routed_down.contiguous(), expert_block_scale.float().contiguous(), accumulate.contiguous(), out,
        R, d, K=top_i.shape[1], B=b, ACT=ACTIVATION_CODES[activation], BLOCK_D=block_d, BLOCK_K=block_k, BLOCK_N=block_n,
    )
    return out
