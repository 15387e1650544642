"""The mixture-of-masks FFN in its training form (DESIGN.md, "The MoM layer").

Dense gated FFN: y = W_down (act(W_gate x) * (W_up x)). The F intermediate neurons are grouped in
N = F / b contiguous blocks; each of E experts has one hard-concrete gate per block. A linear router
picks the top-k experts per token, its softmax weights renormalised over the top-k, and block j of
token t is scaled by w[t, j] = sum_{e in topk(t)} r[t, e] z[e, j]. With every gate on, w = 1 and the
layer equals the dense FFN.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from momcompress.learn.gates import deterministic_gates, log_prob_zero, sample_gates
from momcompress.errors import UnsupportedArchitectureError
from momcompress.models import decoder_layers, permute_ffn

GATE_MODES = ("sample", "deterministic", "dense")
# log P(z = 0) of a gate that is surely on: exp(LOG_ZERO) underflows to 0, and 0 * LOG_ZERO stays finite.
LOG_ZERO = -200.0


@dataclass
class LayerStats:
    """What one forward pass of a MoM layer reports to the trainer (tensors keep their graph)."""

    ratio: torch.Tensor  # () expected fraction of FFN blocks read, mean over tokens
    balance: torch.Tensor  # () Switch-style load-balancing loss, 1.0 when perfectly balanced
    expert_load: torch.Tensor  # (E,) fraction of routed slots per expert (no grad)
    top_i: torch.Tensor  # (..., k) selected experts per token (no grad)


class MoMFFN(nn.Module):
    """Wraps a gated FFN module (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``)."""

    learned_ffn = True  # learned_layers finds it (so does the per-token selector's layer)

    def __init__(self, mlp: nn.Module, num_experts: int, top_k: int, block_size: int, log_alpha_init: float = 3.0):
        super().__init__()
        self.mlp = mlp
        hidden = mlp.gate_proj.in_features
        width = mlp.gate_proj.out_features
        if width % block_size:
            raise ValueError(f"block size {block_size} does not divide the FFN width {width}")
        self.num_experts, self.top_k, self.block_size = num_experts, top_k, block_size
        self.num_blocks = width // block_size
        w = mlp.gate_proj.weight
        self.log_alpha = nn.Parameter(torch.full((num_experts, self.num_blocks), float(log_alpha_init), device=w.device))
        # The router runs in fp32 whatever the model dtype: routing decisions must not flip with precision.
        self.router = nn.Linear(hidden, num_experts, bias=False, device=w.device, dtype=torch.float32)
        nn.init.normal_(self.router.weight, std=0.02)
        self.gate_mode = "deterministic"
        self.generator: torch.Generator | None = None  # noise source in "sample" mode (set per step)
        self.ratio_grad_temperature = 1.0  # >1 widens the sigmoid behind the ratio's gradient (see _stats())
        self.ratio_grad = True  # False: the ratio is a reported number only (projection control), no graph
        self.track_stats = False
        self.last_stats: LayerStats | None = None
        self.gate_override: torch.Tensor | None = None  # (E, N) fixed gate values, e.g. target-matched masks
        # Frozen copy of the original FFN, used in "dense" mode when the MoM weights are being tuned, so
        # the distillation teacher and the dense reference stay the original model.
        self.reference_mlp: nn.Module | None = None
        # Order of the FFN neurons the blocks are cut from: block j holds original neurons
        # neuron_perm[j*b:(j+1)*b]. None = the original order (see permute_neurons).
        self.neuron_perm: torch.Tensor | None = None

    @torch.no_grad()
    def permute_neurons(self, perm: torch.Tensor) -> None:
        """Reorder the FFN's intermediate neurons (rows of gate/up, columns of down) by perm (F,).

        A function-preserving change of basis: the dense FFN computes exactly the same output, but
        contiguous blocks now hold the neurons perm groups together (co-activating ones, see
        learn/init.py), so a block mask can follow what tokens use. Composes with an earlier call.
        """
        width = self.mlp.gate_proj.out_features
        perm = perm.to(dtype=torch.long, device="cpu")
        if perm.shape != (width,) or not torch.equal(perm.sort().values, torch.arange(width)):
            raise ValueError(f"a neuron permutation must reorder all {width} FFN neurons")
        for mlp in (self.mlp, self.reference_mlp):
            if mlp is not None:
                permute_ffn(mlp, perm)
        self.neuron_perm = perm if self.neuron_perm is None else self.neuron_perm[perm]

    def freeze_reference(self) -> None:
        """Keep a frozen copy of the current FFN weights as the dense reference (for weight tuning)."""
        import copy

        self.reference_mlp = copy.deepcopy(self.mlp).requires_grad_(False)

    # -- gates ------------------------------------------------------------------------------------
    def gate_values(self) -> torch.Tensor:
        """(E, N) gate values for the current mode."""
        if self.gate_override is not None:
            return self.gate_override
        if self.gate_mode == "sample":
            return sample_gates(self.log_alpha, self.generator)
        return deterministic_gates(self.log_alpha)

    def block_off_logprob(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(E, N) log P(block gate is off), as the activation ratio counts it.

        Returns (q, q_wide): q is log P(z = 0) (0 or a large negative number for fixed gates);
        q_wide, when not None, comes from a sigmoid widened by ``ratio_grad_temperature`` and supplies
        the ratio's gradient, so that it does not vanish when gates start fully on (DESIGN.md, lessons
        of the first runs).
        """
        fixed = {"dense": torch.ones_like, "deterministic": deterministic_gates}.get(self.gate_mode)
        if self.gate_override is not None or fixed is not None:
            gates = self.gate_override if self.gate_override is not None else fixed(self.log_alpha)
            return torch.where(gates > 0, LOG_ZERO, 0.0).to(torch.float32), None
        q = log_prob_zero(self.log_alpha)
        if self.ratio_grad_temperature == 1.0 or not torch.is_grad_enabled():
            return q, None
        return q, log_prob_zero(self.log_alpha / self.ratio_grad_temperature)

    # -- routing ----------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k routing. Returns probs (..., E), renormalised top-k weights (..., k), indices (..., k)."""
        with torch.autocast(x.device.type, enabled=False):
            probs = torch.softmax(self.router(x.float()), dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        top_w = top_p / top_p.sum(dim=-1, keepdim=True)
        if self.top_k == 1 and torch.is_grad_enabled():
            # Renormalised over one expert the weight is always 1 and the router would get no gradient;
            # pass the task's gradient to the chosen expert's probability instead (value unchanged).
            top_w = top_w + (top_p - top_p.detach())
        return probs, top_w, top_i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_mode == "dense":
            return (self.reference_mlp if self.reference_mlp is not None else self.mlp)(x)
        mlp = self.mlp
        h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # (..., F)
        probs, top_w, top_i = self.route(x)  # (..., E), (..., k), (..., k)
        z = self.gate_values()  # (E, N)
        # w = sum_k top_w z[top_i] as one (T, E) @ (E, N) product: no (T, k, N) gather, whatever k is.
        route_w = torch.zeros_like(probs).scatter(-1, top_i, top_w)  # (..., E), zero off the top-k
        with torch.autocast(x.device.type, enabled=False):
            w = route_w @ z.float()  # (..., N)
        lead = h.shape[:-1]
        h = (h.view(*lead, self.num_blocks, self.block_size) * w.unsqueeze(-1).to(h.dtype)).view(*lead, -1)
        if self.track_stats:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.ratio_grad):
                self.last_stats = self._stats(probs, top_i)
        return mlp.down_proj(h)

    def _stats(self, probs: torch.Tensor, top_i: torch.Tensor) -> LayerStats:
        q_off, q_wide = self.block_off_logprob()  # (E, N)
        chosen = torch.zeros_like(probs).scatter(-1, top_i, 1.0).reshape(-1, self.num_experts)  # (T, E)
        with torch.autocast(probs.device.type, enabled=False):
            ratio = union_ratio_of(chosen, q_off).mean()
            if q_wide is not None:  # value of the exact ratio, gradient of the widened one
                wide = union_ratio_of(chosen, q_wide).mean()
                ratio = wide + (ratio - wide).detach()
        E = self.num_experts
        slots = torch.zeros(E, device=probs.device).scatter_add_(
            0, top_i.reshape(-1), torch.ones(top_i.numel(), device=probs.device)
        )
        load = slots / slots.sum()  # (E,) fraction of routed slots
        mean_prob = probs.reshape(-1, E).mean(dim=0)  # (E,)
        return LayerStats(
            ratio=ratio, balance=E * (load.detach() * mean_prob).sum(), expert_load=load.detach(), top_i=top_i.detach()
        )


def union_ratio_of(chosen: torch.Tensor, log_off: torch.Tensor) -> torch.Tensor:
    """Per-token fraction of blocks read: mean_j [1 - prod_{e chosen} P(z[e, j] = 0)].

    Args:
        chosen: (T, E) 1 for each token's selected experts, else 0.
        log_off: (E, N) log P(z = 0) per expert and block (LOG_ZERO for a gate that is surely on).
    Returns:
        (T,) union ratio; the product over the chosen experts is one (T, E) @ (E, N) matmul in log space.
    """
    return (1.0 - torch.exp(chosen @ log_off.float())).mean(dim=-1)


def wrap_with_mom(model: nn.Module, num_experts: int, top_k: int, block_size: int, log_alpha_init: float = 3.0):
    """Replace each decoder layer's FFN with a MoMFFN (in place) and return the list of MoM layers."""
    layers = []
    for layer in decoder_layers(model):
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            if not hasattr(mlp, name):
                raise UnsupportedArchitectureError(f"FFN {type(mlp).__name__} has no {name}: not a gated FFN we can wrap")
        if isinstance(mlp, MoMFFN):
            raise ValueError("model is already wrapped with MoM layers")
        layer.mlp = MoMFFN(mlp, num_experts, top_k, block_size, log_alpha_init)
        layers.append(layer.mlp)
    return layers


def mom_layers(model: nn.Module) -> list[MoMFFN]:
    """All MoM layers of a wrapped model, in module order."""
    return [m for m in model.modules() if isinstance(m, MoMFFN)]


def learned_layers(model: nn.Module) -> list[nn.Module]:
    """Every FFN learn wraps (MoM layers or per-token selector layers), in module order."""
    return [m for m in model.modules() if getattr(m, "learned_ffn", False)]


@contextlib.contextmanager
def gate_mode(model: nn.Module, mode: str):
    """Temporarily set every learned layer's gate mode ("sample", "deterministic" or "dense")."""
    if mode not in GATE_MODES:
        raise ValueError(f"gate mode must be one of {GATE_MODES}, got {mode!r}")
    layers = learned_layers(model)
    before = [m.gate_mode for m in layers]
    for m in layers:
        m.gate_mode = mode
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m.gate_mode = b


@contextlib.contextmanager
def tracking(model: nn.Module, on: bool = True):
    """Make every learned layer record its stats (LayerStats, SelectStats) on its forward passes."""
    layers = learned_layers(model)
    for m in layers:
        m.track_stats, m.last_stats = on, None
    try:
        yield layers
    finally:
        for m in layers:
            m.track_stats = False
