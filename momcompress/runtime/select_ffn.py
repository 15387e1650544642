"""The frozen per-token selector FFN: what `freeze` writes for `learn --selector activations` and
`momcompress.load` runs (DESIGN.md, "Per-token selection").

One layer holds, for hidden size d and F' stored neurons (the FFN's neurons minus the pruned ones):
    gate_up      (d, 2F')  W_gate and W_up transposed and interleaved: row j holds, for every stored
                           neuron i, its gate weight (column 2i) and up weight (column 2i + 1) on
                           input channel j: what a token reads when it keeps channel j, and a neuron's
                           gate and up side by side for kernels that work on a range of neurons
    down         (F', d)   W_down transposed: row i is the output column of stored neuron i
    x_threshold  (d,) fp32 channel j is read when |x_j| > x_threshold[j]  (exp(theta_x) / ||column j||;
                           -1 for a channel every calibration token kept: shared; inf: pruned)
    h_threshold  (F',) fp32 neuron i is read when |h_i| > h_threshold[i] (exp(theta_h) / ||W_down[:, i]||;
                           -1 for shared neurons)
For a token x: x_s = x * (|x| > x_threshold); (g, u) = x_s @ gate_up; h = act(g) * u;
y = (h * (|h| > h_threshold)) @ down. The token reads 2 F' kept_x + d kept_h of the dense FFN's 3 F d
parameters, plus the d + F' thresholds (its selector).

Execution paths (`FrozenSelectFFN.path` forces one):
- masked (any device, any token count): the formula above with dense matmuls over masked inputs; it
  computes the zeros too, at the speed of the dense FFN;
- fused (CPU, fp32, few tokens, Numba installed, and measured faster than masked on this CPU at the first
  one-token call): kernels/cpu_select.py reads only the kept channels' rows of gate_up and the kept
  neurons' rows of down, where they lie;
- under torch.export / ONNX export: one `momcompress::select_ffn` node (kernels/select_op.py).
"""

from __future__ import annotations

import torch
from torch import nn

from momcompress.kernels.reference import ACTIVATIONS, select_ffn_reference

PATHS = ("auto", "masked", "fused")


def _tracing() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.compiler.is_compiling() or exporting() or torch.onnx.is_in_onnx_export()


class FrozenSelectFFN(nn.Module):
    """A frozen per-token selector FFN (see the module docstring for the tensors and the formula)."""

    def __init__(self, hidden_size: int, width: int, num_neurons: int, activation: str,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        d, n = hidden_size, num_neurons
        self.hidden_size, self.width, self.num_neurons, self.activation = d, width, n, activation
        self.gate_up = nn.Parameter(torch.zeros(d, 2 * n, dtype=dtype, device=device), requires_grad=False)
        self.down = nn.Parameter(torch.zeros(n, d, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer("x_threshold", torch.zeros(d, dtype=torch.float32, device=device))
        self.register_buffer("h_threshold", torch.zeros(n, dtype=torch.float32, device=device))
        self.path = "auto"
        self.track_stats = False
        self.last_ratio: torch.Tensor | None = None  # (T,) fraction of the dense FFN's parameters each token read
        self.last_kept: tuple[torch.Tensor, torch.Tensor] | None = None  # (T,) kept channels, (T,) kept neurons

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, neurons={self.num_neurons} of {self.width}, activation={self.activation}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.hidden_size)  # (T, d)
        if _tracing():
            from momcompress.kernels.select_op import select_ffn

            out = select_ffn(xf, self.x_threshold, self.gate_up, self.down, self.h_threshold, self.activation)
        elif self.track_stats:
            out = self._masked_with_stats(xf)
        else:
            path = self.path if self.path != "auto" else self.choose_path(xf)
            if path == "fused":
                from momcompress.kernels import cpu_select

                out = cpu_select.select_ffn_rows(xf, self.x_threshold, self.gate_up, self.down, self.h_threshold, self.activation)
            elif path == "masked":
                out = self.masked(xf)
            else:
                raise ValueError(f"FrozenSelectFFN.path must be one of {PATHS}, got {path!r}")
        return out.view(*lead, self.hidden_size)

    def choose_path(self, x: torch.Tensor) -> str:
        """The path for x (T, d): the fused CPU kernel when it can run, the call has few tokens and the kernel
        measured faster than the masked path on this CPU (cpu_select.fused_wins), else masked."""
        from momcompress.kernels import cpu_select

        if cpu_select.runs_on(x, self.gate_up) and x.shape[0] <= cpu_select.max_tokens() and cpu_select.fused_wins(self, x):
            return "fused"
        return "masked"

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on x (T, d) with dense matmuls over masked inputs (computes the zeros too)."""
        return select_ffn_reference(x, self.x_threshold, self.gate_up, self.down, self.h_threshold, self.activation)

    def _masked_with_stats(self, x: torch.Tensor) -> torch.Tensor:
        keep_x = x.abs() > self.x_threshold  # (T, d)
        gu = ((x * keep_x.to(x.dtype)) @ self.gate_up).view(x.shape[0], -1, 2)  # (T, F', 2)
        h = ACTIVATIONS[self.activation](gu[..., 0]) * gu[..., 1]
        keep_h = h.abs() > self.h_threshold  # (T, F')
        kx, kh = keep_x.sum(-1).float(), keep_h.sum(-1).float()
        self.last_kept = (kx, kh)
        self.last_ratio = (2.0 * self.num_neurons * kx + self.hidden_size * kh) / (3.0 * self.hidden_size * self.width)
        return (h * keep_h.to(h.dtype)) @ self.down

    # -- sizes --------------------------------------------------------------------------------------
    def selector_params(self) -> int:
        """What the selector itself reads per token: the d + F' thresholds."""
        return self.hidden_size + self.num_neurons

    def router_params(self) -> int:
        """No router: the selector's thresholds play its part in the cost (validate counts them)."""
        return self.selector_params()


def select_layers(model: nn.Module) -> list[FrozenSelectFFN]:
    """All frozen selector layers of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, FrozenSelectFFN)]
