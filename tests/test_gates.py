"""Hard-concrete gate math (Louizos et al. 2018) and the union activation ratio."""

import math

import pytest
import torch

from momcompress.learn.gates import (
    HC_BETA,
    HC_GAMMA,
    HC_ZETA,
    LOG_ALPHA_FULLY_OFF,
    LOG_ALPHA_FULLY_ON,
    deterministic_gates,
    prob_nonzero,
    sample_gates,
)


def test_samples_lie_in_unit_interval_with_exact_zeros_and_ones():
    la = torch.linspace(-6, 6, 25).repeat(400)
    z = sample_gates(la, torch.Generator().manual_seed(0))
    assert z.min() >= 0 and z.max() <= 1
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()


@pytest.mark.parametrize("log_alpha", [-3.0, -1.0, 0.0, 1.5, 3.0])
def test_prob_nonzero_matches_sampling_frequency(log_alpha):
    la = torch.full((200_000,), log_alpha)
    z = sample_gates(la, torch.Generator().manual_seed(1))
    empirical = (z > 0).float().mean().item()
    expected = 1 / (1 + math.exp(-(log_alpha - HC_BETA * math.log(-HC_GAMMA / HC_ZETA))))
    assert prob_nonzero(torch.tensor(log_alpha)).item() == pytest.approx(expected, abs=1e-6)
    assert empirical == pytest.approx(expected, abs=0.005)


def test_deterministic_gates_threshold_constants():
    assert deterministic_gates(torch.tensor(LOG_ALPHA_FULLY_ON + 1e-4)).item() == 1.0
    assert deterministic_gates(torch.tensor(LOG_ALPHA_FULLY_OFF - 1e-4)).item() == 0.0
    mid = deterministic_gates(torch.tensor(0.0)).item()
    assert mid == pytest.approx(0.5 * (HC_ZETA - HC_GAMMA) + HC_GAMMA)
    # deterministic: no noise
    la = torch.randn(100)
    assert torch.equal(deterministic_gates(la), deterministic_gates(la))


def test_sampling_is_differentiable_and_seeded():
    la = torch.zeros(50, requires_grad=True)
    z1 = sample_gates(la, torch.Generator().manual_seed(3))
    z2 = sample_gates(la, torch.Generator().manual_seed(3))
    assert torch.equal(z1, z2)
    z1.sum().backward()
    assert la.grad is not None and la.grad.abs().sum() > 0


def test_union_ratio_by_hand():
    # one token, k=2 experts, N=2 blocks
    from momcompress.learn.mom import union_ratio_of

    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # (k=E=2, N=2) P(z != 0) of the token's two experts
    chosen = torch.ones(1, 2)  # the token chose both
    # block 0: 1-(0)(0.5)=1 ; block 1: 1-(1)(0.5)=0.5 ; mean 0.75
    assert union_ratio_of(chosen, torch.log1p(-p).clamp_min(-200.0)).item() == pytest.approx(0.75)
