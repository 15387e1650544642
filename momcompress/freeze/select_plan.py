"""Freeze plan of a per-token selector layer: which channels and neurons are shared, per-token or pruned,
and the repacked `FrozenSelectFFN` (math only; freezer.py orchestrates).

On the fit (calibration) tokens, with the thresholds matched to the target, a neuron that every token
kept is **shared** (always read, no comparison), one that no token kept is **pruned** (not stored), the
rest are **per-token**. Input channels are classified the same way (a pruned channel's row of gate_up is
kept on disk, since rows are indexed by channel, but never read: its threshold is infinite).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from momcompress.runtime.select_ffn import FrozenSelectFFN

ALWAYS = -1.0  # threshold of a shared channel or neuron: every |value| >= 0 clears it


@dataclass
class SelectPlan:
    """One layer's classification: original neuron ids kept (F',), and per class the counts."""

    neurons: torch.Tensor  # (F',) original neuron ids of the stored neurons, ascending
    shared_neurons: torch.Tensor  # (S,) original ids, a subset of neurons
    pruned_neurons: torch.Tensor  # (P,) original ids
    shared_channels: torch.Tensor  # (Sx,) input channel ids
    pruned_channels: torch.Tensor  # (Px,) input channel ids
    theta_x: float
    theta_h: float

    def counts(self) -> dict[str, int]:
        n = len(self.neurons)
        return {
            "shared": len(self.shared_neurons), "per_token": n - len(self.shared_neurons), "pruned": len(self.pruned_neurons),
            "shared_channels": len(self.shared_channels), "pruned_channels": len(self.pruned_channels),
        }

    def to_json(self) -> dict:
        return {"neurons": len(self.neurons), **self.counts(), "theta_x": self.theta_x, "theta_h": self.theta_h}

    def block_ids(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            prefix + "neurons": self.neurons, prefix + "shared": self.shared_neurons, prefix + "pruned": self.pruned_neurons,
            prefix + "shared_channels": self.shared_channels, prefix + "pruned_channels": self.pruned_channels,
        }


def plan_select_layer(channel_counts: torch.Tensor, neuron_counts: torch.Tensor, tokens: int, theta_x: float, theta_h: float) -> SelectPlan:
    """Classify a layer from how many of `tokens` fit tokens kept each channel (d,) and neuron (F,)."""
    if tokens <= 0:
        raise ValueError("a freeze plan needs at least one fit token")
    nc, hc = channel_counts.long().cpu(), neuron_counts.long().cpu()
    return SelectPlan(
        neurons=torch.nonzero(hc > 0).flatten(),
        shared_neurons=torch.nonzero(hc >= tokens).flatten(),
        pruned_neurons=torch.nonzero(hc == 0).flatten(),
        shared_channels=torch.nonzero(nc >= tokens).flatten(),
        pruned_channels=torch.nonzero(nc == 0).flatten(),
        theta_x=float(theta_x),
        theta_h=float(theta_h),
    )


@torch.no_grad()
def repack_select_layer(mlp, x_threshold: torch.Tensor, h_threshold: torch.Tensor, plan: SelectPlan, activation: str) -> FrozenSelectFFN:
    """A FrozenSelectFFN holding the plan's neurons of the gated FFN `mlp` and its thresholds.

    Args:
        mlp: the (tuned) gated FFN: gate_proj, up_proj (F, d), down_proj (d, F).
        x_threshold: (d,) fp32 per-channel thresholds of the learned layer (offset applied).
        h_threshold: (F,) fp32 per-neuron thresholds.
        plan: the layer's classification.
        activation: the FFN's activation name.
    """
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # (F, d), (F, d), (d, F)
    d = wg.shape[1]
    keep = plan.neurons.to(wg.device)
    n = len(keep)
    frozen = FrozenSelectFFN(d, wg.shape[0], n, activation, dtype=wg.dtype, device=wg.device)
    gu = torch.stack([wg[keep], wu[keep]], dim=1)  # (F', 2, d): neuron i's gate then up row
    frozen.gate_up.copy_(gu.reshape(2 * n, d).T)  # (d, 2F') interleaved
    frozen.down.copy_(wd[:, keep].T)  # (F', d)
    xt = x_threshold.detach().float().clone()
    xt[plan.shared_channels.to(xt.device)] = ALWAYS
    xt[plan.pruned_channels.to(xt.device)] = float("inf")
    ht = h_threshold.detach().float()[keep].clone()
    shared = torch.isin(plan.neurons, plan.shared_neurons).to(ht.device)
    ht[shared] = ALWAYS
    frozen.x_threshold.copy_(xt)
    frozen.h_threshold.copy_(ht)
    return frozen
