"""`torch.ops.momcompress.select_ffn`: the per-token selector FFN as one PyTorch custom op.

`FrozenSelectFFN` calls it when it is traced (torch.export, torch.onnx, torch.compile), so that an
exported graph holds one node per layer, which export/op.py translates into a `momcompress::SelectFFN`
ONNX node with a function body of standard ops. Eagerly it runs the masked torch reference; its fake
implementation gives the output shape.

    from momcompress.kernels.select_op import select_ffn
    y = select_ffn(x, x_threshold, gate_up, down, h_threshold, "silu")  # (T, d)
"""

from __future__ import annotations

import torch

from momcompress.kernels.reference import select_ffn_reference


@torch.library.custom_op("momcompress::select_ffn", mutates_args=())
def select_ffn(
    x: torch.Tensor,
    x_threshold: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    h_threshold: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """(T, d) -> (T, d): x_s = x * (|x| > x_threshold); (g, u) = x_s @ gate_up (interleaved); h = act(g) * u;
    out = (h * (|h| > h_threshold)) @ down. Shapes: x_threshold (d,), gate_up (d, 2F'), down (F', d), h_threshold (F',)."""
    return select_ffn_reference(x, x_threshold, gate_up, down, h_threshold, activation)


@select_ffn.register_fake
def _select_ffn_fake(x, x_threshold, gate_up, down, h_threshold, activation):
    torch._check(x.dim() == 2 and gate_up.dim() == 2 and down.dim() == 2, lambda: "select_ffn expects x (T, d), gate_up (d, 2F'), down (F', d)")
    torch._check(gate_up.shape[0] == x.shape[1] and gate_up.shape[1] == 2 * down.shape[0], lambda: "select_ffn: gate_up must be (d, 2F') for down (F', d)")
    return torch.empty_like(x)
