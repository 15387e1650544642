"""Ratio control: the batched offset solver and the matmul union ratio agree with the per-set definitions."""

import pytest
import torch

from momcompress.learn.gates import LOG_ALPHA_FULLY_OFF, log_prob_zero, prob_nonzero
from momcompress.learn.lagrangian import expected_ratio_at, routing_histogram, solve_offset
from momcompress.learn.mom import union_ratio_of
from momcompress.learn.select import _max_log_alpha, _ratio_for_routing


def _routing(L, T, E, k, g):
    return [torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) for _ in range(L)]


@pytest.mark.parametrize("k", [1, 3])
def test_union_ratio_matmul_equals_product_over_chosen(k):
    g = torch.Generator().manual_seed(0)
    E, N, T = 6, 10, 7
    la = torch.randn(E, N, generator=g) * 3
    top_i = _routing(1, T, E, k, g)[0]
    chosen = torch.zeros(T, E).scatter(1, top_i, 1.0)
    p = prob_nonzero(la)
    by_hand = (1 - torch.prod(1 - p[top_i], dim=1)).mean(-1)  # (T,)
    torch.testing.assert_close(union_ratio_of(chosen, log_prob_zero(la)), by_hand)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("target", [0.2, 0.5, 0.9])
def test_solve_offset_hits_the_target_of_the_per_set_definition(k, target):
    g = torch.Generator().manual_seed(k)
    L, E, N, T = 3, 8, 24, 50
    log_alphas = [torch.randn(E, N, generator=g) * 4 + l for l in range(L)]
    hists = [routing_histogram(t, E) for t in _routing(L, T, E, k, g)]
    c = solve_offset(log_alphas, hists, target)
    assert expected_ratio_at(log_alphas, hists, c) == pytest.approx(target, abs=1e-5)


def test_deterministic_ratio_by_max_log_alpha_equals_union_of_on_gates():
    g = torch.Generator().manual_seed(3)
    L, E, N, T, k = 2, 5, 12, 30, 2
    log_alphas = [torch.randn(E, N, generator=g) * 4 for _ in range(L)]
    hists = [routing_histogram(t, E) for t in _routing(L, T, E, k, g)]
    maxima = _max_log_alpha(log_alphas, hists, g)
    for offset in (-2.0, 0.0, 1.5):
        by_hand = 0.0
        for la, (sets, w) in zip(log_alphas, hists):
            on = (la + offset > LOG_ALPHA_FULLY_OFF).float()  # (E, N)
            union = 1 - torch.prod(1 - on[sets], dim=1)  # (S, N)
            by_hand += float((union.mean(1) * w).sum()) / L
        assert _ratio_for_routing(maxima, offset) == pytest.approx(by_hand, abs=1e-6)
