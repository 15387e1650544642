"""The torch reference of the routed experts: the contract every kernel implements (DESIGN.md, "Runtime and kernels").

For token t with top-k experts top_i[t] and renormalised weights top_w[t], routed block r is weighed by
w[t, r] = sum_j top_w[t, j] * z[top_i[t, j], r] (z = expert_block_scale (E, R), 0 where the expert does not
use the block), and
    out[t] = sum_r w[t, r] * (act(Wg_r x[t]) * (Wu_r x[t])) @ Wd_r       (routed blocks (R, b, d), down transposed)
Two forms with the same result: grouped by expert (any token count) and the union of the tokens' blocks
read once (decode). Both run on any device. The per-token selector's layer (runtime/select_ffn.py) has
its reference here too, `select_ffn_reference`; momcompress.kernels and momcompress.runtime import this module,
and it imports neither.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu": F.gelu,
}
# Hugging Face activation names -> ours.
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}


# When the union of the tokens' blocks is at least this fraction of the routed blocks, the union path
# multiplies all routed blocks in place (unused ones weighted 0) instead of copying the union out.
UNION_IN_PLACE_FRACTION = 0.5

_scratch = threading.local()


def _gather_blocks(weight: torch.Tensor, blocks: torch.Tensor, slot: int) -> torch.Tensor:
    """weight (R, b, d) rows of `blocks` (K,) as one (K*b, d) tensor.

    On CPU the copy goes into a reused per-thread buffer: a fresh multi-MB tensor per call costs
    page faults that made the gather 100x slower than the copy itself (measured: 12 ms vs 23 us for
    45 blocks of 16 x 576 fp32).
    """
    d = weight.shape[-1]
    if weight.device.type != "cpu" or torch.compiler.is_compiling():
        return weight.index_select(0, blocks).view(-1, d)
    n = blocks.numel() * weight.shape[1] * d
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    key = (slot, weight.dtype)
    buf = bufs.get(key)
    if buf is None or buf.numel() < n or buf.is_inference() != torch.is_inference_mode_enabled():
        buf = bufs[key] = torch.empty(n, dtype=weight.dtype)
    out = buf[:n].view(blocks.numel(), weight.shape[1], d)
    torch.index_select(weight, 0, blocks, out=out)
    return out.view(-1, d)


def _blocks_forward(x, blocks, scale, routed_gate, routed_up, routed_down, activation: str) -> torch.Tensor:
    """x (T, d) through routed blocks (K,) with per-token block scales (T, K): (T, d)."""
    T, d = x.shape
    b = routed_gate.shape[1]
    wg = _gather_blocks(routed_gate, blocks, 0)  # (K*b, d)
    wu = _gather_blocks(routed_up, blocks, 1)
    wd = _gather_blocks(routed_down, blocks, 2)
    h = ACTIVATIONS[activation](x @ wg.T) * (x @ wu.T)  # (T, K*b)
    h = (h.view(T, -1, b) * scale.unsqueeze(-1).to(h.dtype)).view(T, -1)
    return h @ wd  # (T, d)


def block_weights(top_w: torch.Tensor, top_i: torch.Tensor, expert_block_scale: torch.Tensor) -> torch.Tensor:
    """(T, R) fp32 weight of each routed block for each token: w[t, r] = sum_j top_w[t, j] * z[top_i[t, j], r].

    Reads only the T*k rows of z (E, R) it needs when T*k < E; otherwise one (T, E) @ (E, R) matmul."""
    T, k = top_i.shape
    E = expert_block_scale.shape[0]
    if T * k < E:
        return (top_w.float().unsqueeze(-1) * expert_block_scale[top_i].float()).sum(dim=1)
    w_e = torch.zeros(T, E, dtype=torch.float32, device=top_w.device).scatter_add_(1, top_i, top_w.float())
    return w_e @ expert_block_scale.float()


def routed_experts_grouped(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation: str) -> torch.Tensor:
    """Routed part of a frozen MoM FFN, tokens grouped by expert (the reference for any token count).

    Args:
        x: (T, d) FFN input. top_w: (T, k) renormalised router weights. top_i: (T, k) expert ids.
        routed_gate, routed_up, routed_down: (R, b, d) routed blocks (down transposed).
        expert_block_scale: (E, R) gate value of block r in expert e, 0 where the expert does not use it.
        activation: "silu", "gelu_tanh" or "gelu".
    Returns:
        (T, d): sum over each token's experts e of top_w * W_down_e (act(W_gate_e x) * W_up_e x * z_e).
    """
    T, k = top_i.shape
    flat = top_i.reshape(-1)  # (T*k,)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=expert_block_scale.shape[0]).tolist()
    token_of = order // k  # (T*k,) token of each sorted slot
    weight_of = top_w.reshape(-1)[order].float()  # (T*k,)
    # Expert outputs land in sorted-slot order, then one gather puts them back: cheaper than one
    # scatter-add per expert.
    ys = x.new_zeros(T * k, x.shape[1])  # (T*k, d)
    start = 0
    for e, count in enumerate(counts):
        if count:
            blocks = expert_block_scale[e].nonzero().squeeze(-1)  # (K,)
            if len(blocks):
                tokens = token_of[start : start + count]
                scale = weight_of[start : start + count, None] * expert_block_scale[e, blocks].float()  # (n, K)
                ys[start : start + count] = _blocks_forward(x.index_select(0, tokens), blocks, scale, routed_gate, routed_up, routed_down, activation)
        start += count
    slot_of = torch.empty_like(order)
    slot_of[order] = torch.arange(T * k, device=order.device)  # (T*k,) sorted position of slot (t, j)
    return ys.index_select(0, slot_of).view(T, k, -1).sum(dim=1)


def routed_experts_decode(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation: str) -> torch.Tensor:
    """Same result as routed_experts_grouped, reading the union of the tokens' experts' blocks once (decode,
    and prompts spread over many overlapping experts: FrozenMoMFFN.union_is_cheaper); each token weighs
    each block by w[t, r] = sum_e top_w[t, e] * scale[e, r] (0 for blocks its experts do not use). One token reads exactly its experts' blocks; a few tokens
    read at most the routed blocks once, where grouping by expert would read each expert's blocks again."""
    w = block_weights(top_w, top_i, expert_block_scale)  # (T, R)
    blocks = w.any(dim=0).nonzero().squeeze(-1) if x.shape[0] > 1 else w[0].nonzero().squeeze(-1)  # (K,)
    if len(blocks) == 0:
        return torch.zeros_like(x)
    if len(blocks) >= UNION_IN_PLACE_FRACTION * routed_gate.shape[0]:
        # The union covers most routed blocks: multiply all of them where they lie (the unused ones weigh 0)
        # rather than copy the union first; on CPU the copy cost more than the extra rows (README).
        R, b, d = routed_gate.shape
        h = ACTIVATIONS[activation](x @ routed_gate.view(R * b, d).T) * (x @ routed_up.view(R * b, d).T)  # (T, R*b)
        h = (h.view(-1, R, b) * w.unsqueeze(-1).to(h.dtype)).view(-1, R * b)
        return h @ routed_down.view(R * b, d)  # (T, d)
    return _blocks_forward(x, blocks, w[:, blocks], routed_gate, routed_up, routed_down, activation)


def selected_rows_ffn(x, rows, scale, gate_rows, up_rows, down_rows, activation: str, accumulate=None) -> torch.Tensor:
    """Per-token selected rows, the contract of `momcompress::SelectedRowsFFN` (export/op.py).

    Args:
        x: (T, d). rows: (T, K) int64 row ids, < 0 = padding (skipped). scale: (T, K) per selected row.
        gate_rows, up_rows, down_rows: (R, d) (down transposed: down_rows[r] is W_down[:, r]).
        activation: "silu", "gelu_tanh" or "gelu". accumulate: (T, d) added to the output, or None.
    Returns:
        (T, d) fp32: accumulate[t] + sum_k scale[t, k] act(gate_rows[r] . x[t]) (up_rows[r] . x[t]) down_rows[r], r = rows[t, k].
    """
    x = x.float()
    valid = rows >= 0  # (T, K)
    safe = rows.clamp(min=0)
    g = torch.einsum("tkd,td->tk", gate_rows[safe].float(), x)  # (T, K)
    u = torch.einsum("tkd,td->tk", up_rows[safe].float(), x)
    h = ACTIVATIONS[activation](g) * u * torch.where(valid, scale.float(), torch.zeros_like(scale, dtype=torch.float32))
    out = torch.einsum("tk,tkd->td", h, down_rows[safe].float())  # (T, d)
    return out if accumulate is None else out + accumulate.float()


def expert_rows(top_w, top_i, expert_block_scale, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed experts as per-token selected rows: (rows (T, K) int64, scale (T, K) fp32) such that
    selected_rows_ffn over the (R*b, d) row tables equals routed_experts_grouped over the (R, b, d) blocks.
    K is the most rows one token uses; shorter lists are padded with row -1."""
    w = block_weights(top_w, top_i, expert_block_scale)  # (T, R)
    T, R = w.shape
    lists = []
    for t in range(T):
        blocks = w[t].nonzero().squeeze(-1)  # (K_t,)
        rows = (blocks[:, None] * block_size + torch.arange(block_size)).reshape(-1)
        lists.append((rows, w[t, blocks].repeat_interleave(block_size)))
    K = max(1, max(len(r) for r, _ in lists))
    rows = torch.full((T, K), -1, dtype=torch.int64)
    scale = torch.zeros(T, K)
    for t, (r, s) in enumerate(lists):
        rows[t, : len(r)], scale[t, : len(s)] = r, s
    return rows, scale


def table_matmul(a: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """a @ table in a's dtype: a 16-bit table beside fp32 activations (freeze --table-dtype) is widened, so the
    products are those of the rounded weights and the unrounded activations, as in the row kernels."""
    return a @ (table if table.dtype == a.dtype else table.to(a.dtype))


def select_ffn_reference(x: torch.Tensor, x_threshold: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                         h_threshold: torch.Tensor, activation: str) -> torch.Tensor:
    """The layer's function on x (T, d) with dense matmuls over masked inputs: (T, d)."""
    xs = x * (x.abs() > x_threshold).to(x.dtype)
    gu = table_matmul(xs, gate_up).view(x.shape[0], gate_up.shape[1] // 2, 2)  # (T, F', 2) interleaved gate, up
    h = ACTIVATIONS[activation](gu[..., 0]) * gu[..., 1]  # (T, F')
    h = h * (h.abs() > h_threshold).to(h.dtype)
    return table_matmul(h, down)
