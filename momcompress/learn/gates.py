"""Hard-concrete gates with L0 regularisation (Louizos, Welling & Kingma 2018, "Learning Sparse
Neural Networks through L0 Regularization"). Pure math: no I/O, no model code.

A gate has one parameter ``log_alpha``. In training a gate value is sampled as
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta),  u ~ U(0, 1)
    z = clamp(s * (zeta - gamma) + gamma, 0, 1)
and the probability that a gate is non-zero is
    P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta)).
At evaluation the gate is deterministic: z = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1).
"""

from __future__ import annotations

import math

import torch

# Stretch interval and temperature from Louizos et al. 2018 (section 4), as DESIGN.md fixes them.
HC_GAMMA = -0.1
HC_ZETA = 1.1
HC_BETA = 2.0 / 3.0
# log_alpha above which the deterministic gate is exactly 1: sigmoid(la) >= (1 - gamma) / (zeta - gamma).
LOG_ALPHA_FULLY_ON = math.log((1 - HC_GAMMA) / (HC_ZETA - 1))  # = log 11 ~ 2.398
# log_alpha below which the deterministic gate is exactly 0: sigmoid(la) <= -gamma / (zeta - gamma).
LOG_ALPHA_FULLY_OFF = math.log(-HC_GAMMA / HC_ZETA)  # = -log 11 ~ -2.398
_P_SHIFT = HC_BETA * math.log(-HC_GAMMA / HC_ZETA)  # beta * log(-gamma/zeta) ~ -1.599


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) for each gate."""
    return torch.sigmoid(log_alpha - _P_SHIFT)


def log_prob_zero(log_alpha: torch.Tensor) -> torch.Tensor:
    """log P(z = 0) = log(1 - P(z != 0)) for each gate, computed stably as -softplus(.)."""
    return -torch.nn.functional.softplus(log_alpha - _P_SHIFT)


def sample_gates(log_alpha: torch.Tensor, generator: torch.Generator | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Draw one hard-concrete sample per gate (differentiable in log_alpha); values in [0, 1]."""
    device = generator.device if generator is not None else log_alpha.device
    u = torch.rand(log_alpha.shape, generator=generator, dtype=torch.float32, device=device)
    u = u.to(log_alpha.device, log_alpha.dtype).clamp(eps, 1 - eps)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / HC_BETA)
    return (s * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)


def deterministic_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """The evaluation-time gate value (no noise); exactly 0 or 1 once log_alpha is far from 0."""
    return (torch.sigmoid(log_alpha) * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)
