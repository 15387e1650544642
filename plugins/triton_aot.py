"""The single fused Triton kernel that TensorRT's ahead-of-time plugin embeds (plugins/mom_experts.py).

A TensorRT AOT plugin launches one kernel with the node's input and output pointers and a few scalar
arguments, with no workspace. So unlike momcompress.kernels.triton_mom (a plan kernel, then atomics),
this kernel does all of MoMExperts in one launch: one program per (token, tile of BLOCK_D output
features); it walks the routed blocks, skips every block whose weight w[t, r] is 0 without reading it,
and for the others computes the b neurons of the block (gate/up over all of d) and adds their down
projection to its output tile; then out = accumulate + routed. Each program of a token recomputes the
gate/up dot products of the token's active blocks (d / BLOCK_D programs per token), which keeps the
kernel free of atomics and workspace; BLOCK_D = d (one program per token) reads each active weight once.

Tested on CPU against the torch reference with TRITON_INTERPRET=1 (tests/test_export.py). Imports
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
    K: tl.constexpr, B: tl.constexpr, ACT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (t, p): out[t, p*BLOCK_D : (p+1)*BLOCK_D] = accumulate + routed experts of token t."""
    t = tl.program_id(0)
    p = tl.program_id(1)
    cols = p * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) output features of this program
    cmask = cols < d
    rows = tl.arange(0, B)  # (B,) neurons of a block
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r in range(0, R):
        w = 0.0
        for j in tl.static_range(K):
            e = tl.load(top_i_ptr + t * K + j)
            w += tl.load(top_w_ptr + t * K + j).to(tl.float32) * tl.load(scale_ptr + e * R + r).to(tl.float32)
        if w != 0.0:  # blocks no selected expert uses are never read
            base = (r * B + rows).to(tl.int64) * d  # (B,) weight row offsets
            hg = tl.zeros([B], dtype=tl.float32)
            hu = tl.zeros([B], dtype=tl.float32)
            for k0 in range(0, d, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                kmask = ks < d
                xv = tl.load(x_ptr + t * d + ks, mask=kmask, other=0.0).to(tl.float32)
                m2 = kmask[None, :]
                wg = tl.load(gate_ptr + base[:, None] + ks[None, :], mask=m2, other=0.0).to(tl.float32)  # (B, BLOCK_K)
                wu = tl.load(up_ptr + base[:, None] + ks[None, :], mask=m2, other=0.0).to(tl.float32)
                hg += tl.sum(wg * xv[None, :], axis=1)
                hu += tl.sum(wu * xv[None, :], axis=1)
            h = _act(hg, ACT) * hu * w  # (B,)
            wd = tl.load(down_ptr + base[:, None] + cols[None, :], mask=cmask[None, :], other=0.0).to(tl.float32)  # (B, BLOCK_D)
            acc += tl.sum(h[:, None] * wd, axis=0)
    prev = tl.load(acc_ptr + t * d + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * d + cols, (acc + prev).to(out_ptr.dtype.element_ty), mask=cmask)


def tiles(d: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_K) for hidden size d: output tiles of up to 1024 features, 128-wide reductions."""
    return min(triton.next_power_of_2(d), 1024), min(triton.next_power_of_2(d), 128)


def mom_experts(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, accumulate, activation: str) -> torch.Tensor:
    """Launch the kernel on torch tensors (the contract of export/op.py's MoMExperts): (T, d)."""
    T, d = x.shape
    R, b, _ = routed_gate.shape
    if b & (b - 1):
        raise ValueError(f"the fused kernel needs a power-of-two block size, got {b}")
    out = torch.empty_like(x)
    block_d, block_k = tiles(d)
    grid = (T, triton.cdiv(d, block_d))
    mom_experts_kernel[grid](
        x.contiguous(), top_w.float().contiguous(), top_i.contiguous(), routed_gate.contiguous(), routed_up.contiguous(),
        routed_down.contiguous(), expert_block_scale.float().contiguous(), accumulate.contiguous(), out,
        R, d, K=top_i.shape[1], B=b, ACT=ACTIVATION_CODES[activation], BLOCK_D=block_d, BLOCK_K=block_k,
    )
    return out
