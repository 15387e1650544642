"""Triton kernels for the routed part of the frozen MoM FFN (DESIGN.md, "Runtime and kernels").

The contract is `momcompress.runtime.mom_ffn.routed_experts_grouped`: for each token t,
    out[t] = sum_r w[t, r] * (act(x[t] . Wg_r^T) * (x[t] . Wu_r^T)) @ Wd_r,   w[t, r] = sum_j top_w[t, j] * z[top_i[t, j], r]
with the routed blocks stored as (R, b, d) row blocks (down transposed) and z = expert_block_scale (E, R).

Two paths, chosen by token count in `routed_experts_triton`:
- decode (T <= DECODE_KERNEL_MAX_TOKENS): a plan kernel lists each token's active blocks (w[t, r] != 0);
  one program per (token, tile of BLOCK_N active neuron rows) computes h = act(gate) * up * w of those
  rows; then one program per (token, tile of output features, split of the active neurons) sums h * Wd
  over its split into a partial output, and the splits are summed (a split reduction: no atomics).
  Programs cover neuron rows, not blocks, so the block size b (1, 2, 4, 16 or any divisor of the FFN
  width) only maps a row to its block. Each needed weight byte is read once per token; no host
  synchronisation.
- grouped (more tokens): token slots (token, j) are sorted by expert and padded to BLOCK_M (as MoE
  engines do), then a grouped GEMM over each expert's own block list writes h = act(gate) * up * z * top_w
  and a second grouped GEMM applies the down projection; the k slots of a token are summed at the end.
Both accumulate in fp32 and take fp16, bf16 or fp32 inputs.

The launchers take plain tensors, so tests run them on CPU tensors with TRITON_INTERPRET=1 set before
Triton is imported (see tests/test_kernels.py). This module imports triton at import time: import it
lazily (momcompress.kernels does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Up to this many tokens the per-token decode kernel runs; above it, the grouped kernels.
DECODE_KERNEL_MAX_TOKENS = 16
# Activation name -> the constexpr code the kernels branch on.
ACTIVATION_CODES = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
# The grouped path keeps h (T*k, R*b) in memory; longer inputs run in token chunks below this size.
GROUPED_H_BYTES = 512 * 2**20


def _activation_code(activation: str) -> int:
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {sorted(ACTIVATION_CODES)}, got {activation!r}")
    return ACTIVATION_CODES[activation]


# -- device functions ---------------------------------------------------------------------------------
@triton.jit
def _activation(g, ACT: tl.constexpr):
    """act(g) in fp32: 0 silu, 1 gelu (tanh approximation), 2 gelu (erf)."""
    if ACT == 0:
        return g * tl.sigmoid(g)
    elif ACT == 1:
        # tanh(u) = 2 sigmoid(2u) - 1; sqrt(2 / pi) = 0.7978845608
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))
    else:
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))


# -- decode ---------------------------------------------------------------------------------------------
@triton.jit
def _decode_plan_kernel(
    top_w_ptr, top_i_ptr, scale_ptr, active_ptr, weight_ptr, count_ptr,
    R,
    K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Per token t: its active blocks active[t, :count[t]] with weights w (compacted)."""
    t = tl.program_id(0)
    n = tl.full([], 0, tl.int32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        rmask = r < R
        w = tl.zeros([BLOCK_R], dtype=tl.float32)
        for j in tl.static_range(K):
            e = tl.load(top_i_ptr + t * K + j)
            wj = tl.load(top_w_ptr + t * K + j).to(tl.float32)
            w += wj * tl.load(scale_ptr + e * R + r, mask=rmask, other=0.0).to(tl.float32)
        nz = (w != 0.0) & rmask
        pos = n + tl.cumsum(nz.to(tl.int32), axis=0) - 1  # (BLOCK_R,) slot of each active block
        tl.store(active_ptr + t * R + pos, r, mask=nz)
        tl.store(weight_ptr + t * R + pos, w, mask=nz)
        n += tl.sum(nz.to(tl.int32), axis=0)
    tl.store(count_ptr + t, n)


@triton.jit
def _decode_gate_up_kernel(
    x_ptr, gate_ptr, up_ptr, active_ptr, weight_ptr, count_ptr, h_ptr,
    R, b, d,
    ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (t, p): h[t, n] = act(Wg_n x) * (Wu_n x) * w for the active neurons n in [p*BLOCK_N, (p+1)*BLOCK_N)
    of token t (neuron n is row n % b of its (n // b)-th active block: gathered rows, any b)."""
    t = tl.program_id(0)
    p = tl.program_id(1)
    n_active = tl.load(count_ptr + t) * b  # active neurons of token t
    if p * BLOCK_N < n_active:
        n = p * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        nmask = n < n_active
        slot = n // b
        blk = tl.load(active_ptr + t * R + slot, mask=nmask, other=0)
        w = tl.load(weight_ptr + t * R + slot, mask=nmask, other=0.0)
        row = (blk.to(tl.int64) * b + n % b) * d  # (BLOCK_N,) offset of each neuron's weight row
        acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            off = d0 + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
            dmask = off < d
            xv = tl.load(x_ptr + t * d + off, mask=dmask, other=0.0).to(tl.float32)
            m2 = nmask[:, None] & dmask[None, :]
            wg = tl.load(gate_ptr + row[:, None] + off[None, :], mask=m2, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
            wu = tl.load(up_ptr + row[:, None] + off[None, :], mask=m2, other=0.0).to(tl.float32)
            acc_g += tl.sum(wg * xv[None, :], axis=1)
            acc_u += tl.sum(wu * xv[None, :], axis=1)
        h = _activation(acc_g, ACT) * acc_u * w  # (BLOCK_N,); 0 on masked neurons
        tl.store(h_ptr + t.to(tl.int64) * R * b + n, h, mask=nmask)


@triton.jit
def _decode_down_kernel(
    h_ptr, down_ptr, active_ptr, count_ptr, part_ptr,
    T, R, b, d, SPLIT_N,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (t, q, s): part[s, t, q-th BLOCK_D features] = sum of h[t, n] * Wd_n over the active neurons n
    of split s ([s*SPLIT_N, (s+1)*SPLIT_N)); a split reduction, summed by the host: no atomics."""
    t = tl.program_id(0)
    q = tl.program_id(1)
    s = tl.program_id(2)
    n_active = tl.load(count_ptr + t) * b
    cols = q * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    cmask = cols < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    end = tl.minimum(s * SPLIT_N + SPLIT_N, n_active)
    for n0 in range(s * SPLIT_N, end, BLOCK_K):
        n = n0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        nmask = n < end
        blk = tl.load(active_ptr + t * R + n // b, mask=nmask, other=0)
        row = (blk.to(tl.int64) * b + n % b) * d
        h = tl.load(h_ptr + t.to(tl.int64) * R * b + n, mask=nmask, other=0.0)  # (BLOCK_K,)
        wd = tl.load(down_ptr + row[:, None] + cols[None, :], mask=nmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(h[:, None] * wd, axis=0)
    tl.store(part_ptr + (s.to(tl.int64) * T + t) * d + cols, acc, mask=cmask)


# Programs the decode kernels aim for (a few per SM of a large GPU); fewer leave the GPU idle at T = 1.
DECODE_TARGET_PROGRAMS = 512


def _decode_tiles(T: int, R: int, b: int, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_D, BLOCK_K, SPLIT) for the decode kernels.

    gate/up: 8 neuron rows x 256 features per load (2048 weights; larger tiles need over 200 registers a
    thread on sm_90), 4 rows when that leaves under ~256 programs. down: tiles of BLOCK_K rows x BLOCK_D
    features, the neurons split so that T x (d / BLOCK_D) x SPLIT is about DECODE_TARGET_PROGRAMS.
    None of this depends on b: the kernels walk neuron rows, b only maps a row to its block."""
    width = R * b  # upper bound of a token's active neurons
    block_n = 8 if T * width // 2 // 8 >= 256 else 4
    block_d = min(triton.next_power_of_2(d), 2048 // block_n)
    down_d = min(triton.next_power_of_2(d), 256)
    block_k = 8
    tiles = T * triton.cdiv(d, down_d)
    split = max(1, min(triton.cdiv(DECODE_TARGET_PROGRAMS, tiles), triton.cdiv(width, 64)))
    return block_n, block_d, block_k, split


def routed_experts_decode_triton(
    x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation: str,
    block_n: int | None = None, block_d: int | None = None, block_k: int | None = None, split: int | None = None,
) -> torch.Tensor:
    """Routed part for few tokens, per token over its active neurons (same contract as the reference).

    Three launches, no host synchronisation: a plan (each token's active blocks, compacted), gate/up (h
    of each active neuron, BLOCK_N gathered rows per program), down (a split reduction over the active
    neurons into split partial outputs, which are then summed).

    Args:
        x: (T, d). top_w: (T, k) fp32. top_i: (T, k) int. routed_gate/up/down: (R, b, d), any b.
        expert_block_scale: (E, R) fp32. activation: "silu", "gelu_tanh" or "gelu".
        block_n, block_d, block_k, split: tile sizes (powers of two) and neuron splits; from the shape when None.
    Returns:
        (T, d) in x's dtype.
    """
    T, d = x.shape
    R, b, _ = routed_gate.shape
    k = top_i.shape[1]
    if T == 0 or R == 0:
        return torch.zeros_like(x)
    auto = _decode_tiles(T, R, b, d)
    block_n, block_d, block_k, split = block_n or auto[0], block_d or auto[1], block_k or auto[2], split or auto[3]
    down_d = min(triton.next_power_of_2(d), 256)
    x = x.contiguous()
    active = torch.empty(T, R, dtype=torch.int32, device=x.device)  # (T, R) active block ids, compacted
    weight = torch.empty(T, R, dtype=torch.float32, device=x.device)  # (T, R) their w[t, r]
    count = torch.empty(T, dtype=torch.int32, device=x.device)  # (T,) number of active blocks
    h = torch.empty(T, R * b, dtype=torch.float32, device=x.device)  # (T, R*b) h of the active neurons, compacted
    split_n = triton.cdiv(triton.cdiv(R * b, split), block_k) * block_k  # neurons per split
    part = torch.empty(split, T, d, dtype=torch.float32, device=x.device)  # (split, T, d) partial outputs
    _decode_plan_kernel[(T,)](
        top_w.float().contiguous(), top_i.contiguous(), expert_block_scale.float().contiguous(), active, weight, count,
        R, K=k, BLOCK_R=min(triton.next_power_of_2(R), 1024),
    )
    _decode_gate_up_kernel[(T, triton.cdiv(R * b, block_n))](
        x, routed_gate.contiguous(), routed_up.contiguous(), active, weight, count, h,
        R, b, d, ACT=_activation_code(activation), BLOCK_N=block_n, BLOCK_D=block_d,
    )
    _decode_down_kernel[(T, triton.cdiv(d, down_d), split)](
        h, routed_down.contiguous(), active, count, part,
        T, R, b, d, split_n, BLOCK_K=block_k, BLOCK_D=down_d,
    )
    return (part[0] if split == 1 else part.sum(dim=0)).to(x.dtype)


# -- grouped (prefill) ------------------------------------------------------------------------------
def align_tokens(top_i: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the T*k token slots by expert, each expert's run padded to a multiple of block_m.

    No host synchronisation: the padded length is the upper bound T*k + E*(block_m - 1).
    Returns:
        sorted_slots: (P,) int32 slot ids t*k + j grouped by expert; padding holds T*k.
        block_expert: (P / block_m,) int32 expert of each run of block_m slots; E past the end.
    """
    flat = top_i.reshape(-1)  # (TK,)
    TK = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))  # (E,)
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = padded.cumsum(0)
    pad_start = pad_end - padded
    count_start = counts.cumsum(0) - counts
    order = flat.argsort(stable=True)  # (TK,) slots sorted by expert
    expert = flat[order]
    position = pad_start[expert] + torch.arange(TK, device=flat.device) - count_start[expert]
    total = triton.cdiv(TK + num_experts * (block_m - 1), block_m) * block_m
    sorted_slots = torch.full((total,), TK, dtype=torch.int32, device=flat.device)
    sorted_slots[position] = order.to(torch.int32)
    starts = torch.arange(0, total, block_m, device=flat.device)
    block_expert = torch.searchsorted(pad_end, starts, right=True).to(torch.int32)
    return sorted_slots, block_expert


def expert_block_lists(expert_block_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each expert's used blocks, in order: blocks (E, R) int32 and scales (E, R) fp32 (the first
    num_blocks[e] entries of row e are valid), num_blocks (E,) int32."""
    used = expert_block_scale != 0  # (E, R)
    blocks = torch.sort((~used).to(torch.uint8), dim=1, stable=True).indices  # used blocks first
    scales = expert_block_scale.float().gather(1, blocks)
    return blocks.to(torch.int32).contiguous(), scales.contiguous(), used.sum(dim=1).to(torch.int32)


@triton.jit
def _grouped_gate_up_kernel(
    x_ptr, gate_ptr, up_ptr, top_w_ptr, sorted_ptr, block_expert_ptr, blocks_ptr, scales_ptr, nblocks_ptr, h_ptr,
    TK, K, E, R, b, d, H_WIDTH,
    ACT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (m, n): h[slots of run m, columns n*BLOCK_N...] = act(x Wg^T) * (x Wu^T) * z * top_w, where
    column c of expert e is neuron c % b of its (c // b)-th block."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < E:
        ncols = tl.load(nblocks_ptr + e) * b
        if pid_n * BLOCK_N < ncols:
            slot = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # (BLOCK_M,)
            mmask = slot < TK
            tok = (slot // K).to(tl.int64)
            c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
            cmask = c < ncols
            blk = tl.load(blocks_ptr + e * R + c // b, mask=cmask, other=0)
            z = tl.load(scales_ptr + e * R + c // b, mask=cmask, other=0.0)
            row = (blk.to(tl.int64) * b + c % b) * d  # (BLOCK_N,)
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, d, BLOCK_K):
                off = k0 + tl.arange(0, BLOCK_K)
                kmask = off < d
                xa = tl.load(x_ptr + tok[:, None] * d + off[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
                wmask = kmask[:, None] & cmask[None, :]
                wg = tl.load(gate_ptr + row[None, :] + off[:, None], mask=wmask, other=0.0)  # (BLOCK_K, BLOCK_N)
                wu = tl.load(up_ptr + row[None, :] + off[:, None], mask=wmask, other=0.0)
                if UPCAST:
                    xa, wg, wu = xa.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
                acc_g = tl.dot(xa, wg, acc_g, input_precision=PREC)
                acc_u = tl.dot(xa, wu, acc_u, input_precision=PREC)
            tw = tl.load(top_w_ptr + slot, mask=mmask, other=0.0)  # (BLOCK_M,)
            h = _activation(acc_g, ACT) * acc_u * tw[:, None] * z[None, :]
            hp = h_ptr + slot.to(tl.int64)[:, None] * H_WIDTH + c[None, :]
            tl.store(hp, h.to(h_ptr.dtype.element_ty), mask=mmask[:, None] & cmask[None, :])


@triton.jit
def _grouped_down_kernel(
    h_ptr, down_ptr, sorted_ptr, block_expert_ptr, blocks_ptr, nblocks_ptr, out_ptr,
    TK, E, R, b, d, H_WIDTH,
    PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (m, n): out[slots of run m, n*BLOCK_N...] = h[slots, :ncols] @ Wd[expert's neurons] (fp32)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < E:
        ncols = tl.load(nblocks_ptr + e) * b
        slot = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # (BLOCK_M,)
        mmask = slot < TK
        slot64 = slot.to(tl.int64)
        on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
        omask = on < d
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, ncols, BLOCK_K):
            c = c0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,) the expert's neuron columns
            cmask = c < ncols
            blk = tl.load(blocks_ptr + e * R + c // b, mask=cmask, other=0)
            row = (blk.to(tl.int64) * b + c % b) * d
            ha = tl.load(h_ptr + slot64[:, None] * H_WIDTH + c[None, :], mask=mmask[:, None] & cmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
            wd = tl.load(down_ptr + row[:, None] + on[None, :], mask=cmask[:, None] & omask[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
            if UPCAST:
                ha, wd = ha.to(tl.float32), wd.to(tl.float32)
            acc = tl.dot(ha, wd, acc, input_precision=PREC)
        tl.store(out_ptr + slot64[:, None] * d + on[None, :], acc, mask=mmask[:, None] & omask[None, :])


# Whether this module's kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
_INTERPRETED = type(_grouped_gate_up_kernel).__name__ == "InterpretedFunction"


def _grouped_tiles(T: int, k: int, E: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for the grouped kernels: BLOCK_M follows the mean slots per
    expert; BLOCK_K 32 and 8 warps keep the two gate/up accumulators from spilling on sm_90."""
    per_expert = T * k / max(E, 1)
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64
    return block_m, 64, 32, 4 if block_m == 16 else 8


def routed_experts_grouped_triton(
    x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation: str,
    block_m: int | None = None, block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
) -> torch.Tensor:
    """Routed part for many tokens, grouped by expert (same contract as the reference).

    Args:
        x: (T, d). top_w: (T, k) fp32. top_i: (T, k) int. routed_gate/up/down: (R, b, d).
        expert_block_scale: (E, R) fp32. activation: "silu", "gelu_tanh" or "gelu".
        block_m, block_n, block_k, num_warps: tiles (powers of two, >= 16) and warps; from the shape when None.
    Returns:
        (T, d) in x's dtype.
    """
    T, d = x.shape
    R, b, _ = routed_gate.shape
    E, k = expert_block_scale.shape[0], top_i.shape[1]
    if T == 0 or R == 0:
        return torch.zeros_like(x)
    auto = _grouped_tiles(T, k, E)
    block_m, block_n, block_k, num_warps = block_m or auto[0], block_n or auto[1], block_k or auto[2], num_warps or auto[3]
    # Triton 3.6's interpreter multiplies bf16 dot operands as raw integers: upcast there (bf16 products are
    # exact in fp32, so the result matches the GPU's bf16 tensor-core dot up to summation order).
    upcast = x.dtype == torch.bfloat16 and _INTERPRETED
    prec = "ieee" if x.dtype == torch.float32 or upcast else "tf32"  # fp32 stays exact; tf32 is unused for 16-bit inputs
    act = _activation_code(activation)
    gate, up, down = routed_gate.contiguous(), routed_up.contiguous(), routed_down.contiguous()
    blocks, scales, nblocks = expert_block_lists(expert_block_scale)
    width = R * b  # upper bound of an expert's neurons: no host synchronisation
    chunk = max(1, GROUPED_H_BYTES // (k * width * x.element_size()))
    out = torch.empty_like(x)
    for t0 in range(0, T, chunk):
        xc = x[t0 : t0 + chunk].contiguous()  # (Tc, d)
        Tc, TK = xc.shape[0], xc.shape[0] * k
        sorted_slots, block_expert = align_tokens(top_i[t0 : t0 + chunk], E, block_m)
        h = torch.empty(TK, width, dtype=x.dtype, device=x.device)  # (Tc*k, R*b) per-slot hidden
        slots_out = torch.empty(TK, d, dtype=torch.float32, device=x.device)  # (Tc*k, d) per-slot output
        top_w_flat = top_w[t0 : t0 + chunk].float().contiguous().view(-1)
        grid_m = block_expert.numel()
        _grouped_gate_up_kernel[(grid_m, triton.cdiv(width, block_n))](
            xc, gate, up, top_w_flat, sorted_slots, block_expert, blocks, scales, nblocks, h,
            TK, k, E, R, b, d, width,
            ACT=act, PREC=prec, UPCAST=upcast, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        )
        # The down GEMM holds one accumulator instead of two: twice the K tile fits in registers.
        _grouped_down_kernel[(grid_m, triton.cdiv(d, block_n))](
            h, down, sorted_slots, block_expert, blocks, nblocks, slots_out,
            TK, E, R, b, d, width,
            PREC=prec, UPCAST=upcast, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=2 * block_k, num_warps=num_warps,
        )
        out[t0 : t0 + chunk] = slots_out.view(Tc, k, d).sum(dim=1).to(x.dtype)
    return out


# -- dispatch -----------------------------------------------------------------------------------------
def check_arguments(x, routed_gate, routed_up, routed_down, activation: str) -> None:
    """Raise ValueError on an unknown activation or mixed dtypes (the kernels assume one dtype)."""
    _activation_code(activation)
    if not x.dtype == routed_gate.dtype == routed_up.dtype == routed_down.dtype:
        raise ValueError(f"x and the routed blocks must share a dtype, got {x.dtype} and {routed_gate.dtype}")


def routed_experts_triton(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation: str) -> torch.Tensor:
    """The routed part with the kernel that suits the token count: decode up to DECODE_KERNEL_MAX_TOKENS
    (unverified: momcompress.kernels.routed_experts runs these behind a self-check)."""
    check_arguments(x, routed_gate, routed_up, routed_down, activation)
    launch = routed_experts_decode_triton if x.shape[0] <= DECODE_KERNEL_MAX_TOKENS else routed_experts_grouped_triton
    return launch(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation)
