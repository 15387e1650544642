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

import itertools

import torch

from momcompress.learn.gates import prob_nonzero

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
    sets, counts = torch.unique(top_i.reshape(-1, top_i.shape[-1]).sort(dim=-1).values, dim=0, return_counts=True)
    return sets, counts.float() / counts.sum()


def ratio_for_routing(p_on: list[torch.Tensor], hists: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean over layers of the union ratio for fixed routing, given each layer's block-on probabilities (E, N)."""
    total = 0.0
    for p, (sets, weights) in zip(p_on, hists):
        union = 1.0 - torch.prod(1.0 - p[sets], dim=1)  # (S, N)
        total += float((union.mean(dim=1) * weights).sum())
    return total / len(p_on)


def expected_ratio_at(log_alphas: list[torch.Tensor], hists: list[tuple[torch.Tensor, torch.Tensor]], offset: float) -> float:
    """Expected activation ratio if `offset` were added to every layer's log_alpha (E, N)."""
    return ratio_for_routing([prob_nonzero(la + offset) for la in log_alphas], hists)


@torch.no_grad()
def solve_offset(log_alphas: list[torch.Tensor], hists, target: float, iters: int = 40) -> float:
    """Bisection for the offset c with expected_ratio_at(c) = target (the ratio rises with c)."""
    lo, hi = -30.0, 30.0
    for _ in itertools.repeat(None, iters):
        mid = (lo + hi) / 2
        if expected_ratio_at(log_alphas, hists, mid) > target:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2
