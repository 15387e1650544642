"""Deterministic gates and measured activation ratios (shared by learn's final report and freeze).

The measured ratio counts, per token, the FFN blocks that are on in any of its top-k experts with
deterministic gates. `match_target` finds one offset added to every log_alpha so that the measured
ratio on real tokens meets the target: the gates nearest the on/off threshold are the ones it flips.
"""

from __future__ import annotations

import contextlib

import torch

from momcompress.learn.gates import LOG_ALPHA_FULLY_OFF, deterministic_gates
from momcompress.learn.lagrangian import routing_histogram
from momcompress.learn.mom import gate_mode, mom_layers, tracking


@torch.no_grad()
def _forward_routing(model, seqs: torch.Tensor, batch_size: int, offset: float):
    """Run seqs with deterministic gates (log_alpha + offset): (measured ratio per layer, top-k per layer)."""
    layers = mom_layers(model)
    set_gate_offset(model, offset)
    per_layer = torch.zeros(len(layers))
    tops: list[list[torch.Tensor]] = [[] for _ in layers]
    n = 0
    device = next(model.parameters()).device
    try:
        with gate_mode(model, "deterministic"), tracking(model):
            for start in range(0, len(seqs), batch_size):
                batch = seqs[start : start + batch_size].to(device)
                model(input_ids=batch, use_cache=False)
                per_layer += batch.numel() * torch.stack([m.last_stats.ratio.float().cpu() for m in layers])
                for i, m in enumerate(layers):
                    tops[i].append(m.last_stats.top_i.reshape(-1, m.top_k).cpu())
                n += batch.numel()
    finally:
        set_gate_offset(model, None)
    return per_layer / max(n, 1), [torch.cat(t) for t in tops]


@torch.no_grad()
def expected_ratio(model, seqs: torch.Tensor, batch_size: int) -> float:
    """Expected activation ratio (P(z != 0), union over each token's top-k) of the learned gates over seqs."""
    layers = mom_layers(model)
    total, n = 0.0, 0
    device = next(model.parameters()).device
    with gate_mode(model, "sample"), tracking(model):
        for start in range(0, len(seqs), batch_size):
            batch = seqs[start : start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            total += batch.numel() * float(torch.stack([m.last_stats.ratio.float() for m in layers]).mean())
            n += batch.numel()
    return total / max(n, 1)


def measure_ratio(model, seqs: torch.Tensor, batch_size: int, offset: float = 0.0) -> tuple[float, list[float]]:
    """Measured activation ratio of deterministic gates (log_alpha + offset) over seqs: (mean, per layer)."""
    per_layer, _ = _forward_routing(model, seqs, batch_size, offset)
    return float(per_layer.mean()), per_layer.tolist()


# Token sets per layer kept when bisecting the deterministic offset (sampled by their token share):
# the bisection's ratio then has a standard error far below freeze's tolerance, at bounded cost.
MATCH_SETS = 2048


def _max_log_alpha(log_alphas, hists, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (maxima (S, N), weights (S,)): for (sampled) expert sets, each block's largest log_alpha over the set.

    A block is read for that set iff this maximum + offset clears the all-off threshold, so the
    measured ratio of fixed routing is a weighted count of these values above LOG_ALPHA_FULLY_OFF - offset.
    """
    out = []
    for la, (sets, weights) in zip(log_alphas, hists):
        if len(weights) > MATCH_SETS:
            sets = sets[torch.multinomial(weights, MATCH_SETS, replacement=True, generator=generator)]
            weights = torch.full((MATCH_SETS,), 1.0 / MATCH_SETS)
        best = torch.cat([la[sets[i : i + 256]].amax(dim=1) for i in range(0, len(sets), 256)])  # (S, N)
        out.append((best, weights))
    return out


def _ratio_for_routing(maxima, offset: float) -> float:
    """Measured ratio for fixed routing: a block is read when its deterministic gate is non-zero."""
    total = 0.0
    for best, weights in maxima:
        total += float(((best + offset > LOG_ALPHA_FULLY_OFF).float().mean(dim=1) * weights).sum())
    return total / len(maxima)


@torch.no_grad()
def match_target(model, seqs: torch.Tensor, target: float, batch_size: int, tol: float = 0.005, rounds: int = 4) -> tuple[float, float]:
    """Find a global log_alpha offset whose measured ratio on seqs is within tol of target.

    Each round runs the model once to get the routing, bisects the offset for that routing (cheap,
    no model runs), then measures again, since routing moves when gates change. Returns (offset,
    measured ratio), the closest found if no offset meets tol (every gate already on or off).
    """
    layers = mom_layers(model)
    log_alphas = [m.log_alpha.detach().float().cpu() for m in layers]
    generator = torch.Generator().manual_seed(0)
    offset = 0.0
    per_layer, tops = _forward_routing(model, seqs, batch_size, offset)
    best = (offset, float(per_layer.mean()))
    for _ in range(rounds):
        if abs(best[1] - target) <= tol:
            break
        hists = [routing_histogram(t, m.num_experts) for t, m in zip(tops, layers)]
        maxima = _max_log_alpha(log_alphas, hists, generator)
        lo, hi = -60.0, 60.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if _ratio_for_routing(maxima, mid) > target:
                hi = mid
            else:
                lo = mid
        offset = hi if abs(_ratio_for_routing(maxima, hi) - target) < abs(_ratio_for_routing(maxima, lo) - target) else lo
        per_layer, tops = _forward_routing(model, seqs, batch_size, offset)
        ratio = float(per_layer.mean())
        if abs(ratio - target) < abs(best[1] - target):
            best = (offset, ratio)
    return best


@contextlib.contextmanager
def matched_gates(model, offset: float):
    """Run the model with deterministic gates at log_alpha + offset (the target-matched masks)."""
    with gate_mode(model, "deterministic"):
        set_gate_offset(model, offset)
        try:
            yield
        finally:
            set_gate_offset(model, None)


def set_gate_offset(model, offset: float | None) -> None:
    """Fix every layer's gates to deterministic_gates(log_alpha + offset); None restores learned gates."""
    for m in mom_layers(model):
        m.gate_override = None if offset is None else deterministic_gates(m.log_alpha.detach() + offset)
