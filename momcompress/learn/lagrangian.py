"""Control of the activation ratio: Lagrange multipliers, with an optional projection step.

Lagrangian (CoFi, Xia et al. 2022; Sheared-LLaMA, Xia et al. 2023):
    penalty = lambda1 (rho - t) + lambda2 (rho - t)^2
The model minimises it; the multipliers follow gradient ascent on it: lambda1 += lr (rho - t),
lambda2 += lr (rho - t)^2. lambda1 integrates the error (it may go negative, pulling the ratio back
up below the target); lambda2 only grows and damps (the penalty's slope is lambda1 + 2 lambda2 (rho - t)).

Projection: after each optimiser step, one offset c is added to every log_alpha so that the expected
ratio of the step's own routing equals the next scheduled target. The ratio then follows the
warm-up exactly, with no integral wind-up and no overshoot, and the task loss alone decides which
blocks each expert keeps. This is the default: DESIGN.md records the Lagrangian winding up (lambda1
to 415 with the ratio still at 1.0) because the union ratio's gradient vanishes for gates that start on.
"""

from __future__ import annotations


import torch

from momcompress.learn.gates import log_prob_zero, prob_nonzero

CONTROL_MODES = ("projection", "lagrangian")


class RatioController:
    """Keeps the expected activation ratio on the target schedule."""

    def __init__(self, target: float, lr: float, mode: str = "projection"):
        if mode not in CONTROL_MODES:
            raise ValueError(f"control must be one of {CONTROL_MODES}, got {mode!r}")
        self.target, self.lr, self.mode = target, lr, mode
        self.lambda1 = 0.0
        self.lambda2 = 0.0
        self.last_offset = 0.0

    def penalty(self, ratio: torch.Tensor, target: float) -> torch.Tensor:
        if self.mode != "lagrangian":
            return ratio.new_zeros(())
        err = ratio - target
        return self.lambda1 * err + self.lambda2 * err * err

    def update(self, ratio: float, target: float) -> None:
        if self.mode != "lagrangian":
            return
        err = ratio - target
        self.lambda1 += self.lr * err
        self.lambda2 += self.lr * err * err

    def state_dict(self) -> dict:
        return {"lambda1": self.lambda1, "lambda2": self.lambda2, "last_offset": self.last_offset}

    def load_state_dict(self, state: dict) -> None:
        self.lambda1, self.lambda2 = float(state["lambda1"]), float(state["lambda2"])
        self.last_offset = float(state.get("last_offset", 0.0))


def routing_histogram(top_i: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct expert sets chosen by tokens and their token shares: (sets (S, k), weights (S,))."""
    sets = top_i.reshape(-1, top_i.shape[-1]).sort(dim=-1).values  # (T, k)
    k = sets.shape[1]
    if k * max(num_experts - 1, 1).bit_length() <= 62:
        # One int64 key per set: unique over a flat tensor is far faster than unique over rows.
        radix = torch.tensor([num_experts**j for j in range(k)], device=sets.device, dtype=torch.long)
        keys, counts = torch.unique((sets.long() * radix).sum(-1), return_counts=True)
        sets = torch.stack([(keys // num_experts**j) % num_experts for j in range(k)], dim=-1)
    else:
        sets, counts = torch.unique(sets, dim=0, return_counts=True)
    return sets, counts.float() / counts.sum()


def stacked_routing(hists: list[tuple[torch.Tensor, torch.Tensor]], num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's routing histogram as one padded batch.

    Returns chosen (L, S, E), 1 where set s of layer l holds expert e, and weights (L, S) (0 for padding).
    """
    S = max(len(w) for _, w in hists)
    chosen = torch.zeros(len(hists), S, num_experts)
    weights = torch.zeros(len(hists), S)
    for l, (sets, w) in enumerate(hists):
        chosen[l, : len(w)].scatter_(1, sets.cpu(), 1.0)
        weights[l, : len(w)] = w.cpu()
    return chosen, weights


def ratio_for_routing(p_on: list[torch.Tensor], hists: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean over layers of the union ratio for fixed routing, given each layer's block-on probabilities (E, N).

    The per-set definition, kept as the reference the batched solver (_ratio_and_slope) is tested against.
    """
    total = 0.0
    for p, (sets, weights) in zip(p_on, hists):
        union = 1.0 - torch.prod(1.0 - p[sets], dim=1)  # (S, N)
        total += float((union.mean(dim=1) * weights).sum())
    return total / len(p_on)


def expected_ratio_at(log_alphas: list[torch.Tensor], hists: list[tuple[torch.Tensor, torch.Tensor]], offset: float) -> float:
    """Expected activation ratio if `offset` were added to every layer's log_alpha (E, N)."""
    return ratio_for_routing([prob_nonzero(la + offset) for la in log_alphas], hists)


def _ratio_and_slope(log_alpha: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, offset: float) -> tuple[float, float]:
    """Expected ratio at log_alpha + offset for fixed routing, and its derivative in the offset.

    log_alpha (L, E, N), chosen (L, S, E), weights (L, S). With P = P(z != 0) and Q = prod over the
    chosen experts of (1 - P) = exp(chosen @ log(1 - P)), the ratio is mean(1 - Q) and, since
    d log(1 - P) / d offset = -P, its slope is mean(Q * (chosen @ P)).
    """
    a = log_alpha + offset
    q = torch.exp(torch.bmm(chosen, log_prob_zero(a)))  # (L, S, N)
    slope_terms = q * torch.bmm(chosen, prob_nonzero(a))  # (L, S, N)
    w = weights.unsqueeze(-1) / (log_alpha.shape[0] * log_alpha.shape[-1])
    return float(((1.0 - q) * w).sum()), float((slope_terms * w).sum())


@torch.no_grad()
def solve_offset(log_alphas: list[torch.Tensor], hists, target: float, tol: float = 1e-6, iters: int = 60) -> float:
    """The offset c with expected_ratio_at(c) = target (the ratio rises with c), for all layers at once.

    Safeguarded Newton: a Newton step from the current point, replaced by bisection whenever it would
    leave the bracket that holds the root; a handful of batched matmuls instead of 40 passes per layer.
    """
    la = torch.stack([x.detach().float().cpu() for x in log_alphas])  # (L, E, N)
    chosen, weights = stacked_routing(hists, la.shape[1])
    lo, hi, c = -30.0, 30.0, 0.0
    for _ in range(iters):
        r, slope = _ratio_and_slope(la, chosen, weights, c)
        if abs(r - target) <= tol:
            return c
        if r > target:
            hi = c
        else:
            lo = c
        step = c - (r - target) / slope if slope > 1e-12 else None
        c = step if step is not None and lo < step < hi else (lo + hi) / 2
        if hi - lo < 1e-9:
            break
    return c
