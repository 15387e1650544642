"""Expert plans: classify each FFN block as shared, routed or pruned from fixed gate values, and
repack a layer's weights accordingly (DESIGN.md, "Freeze"). Math only: no I/O.

A block on (gate value > 0) in every expert is shared, on in none is pruned, otherwise routed. Expert
e owns the routed blocks it has on, with their gate values as scales; a block on in several experts is
stored once and listed by each of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LayerPlan:
    """One layer's block classification. Block ids are positions in the original FFN (0..N-1)."""

    num_blocks: int
    shared: list[int]
    routed: list[int]  # storage order of the routed blocks
    pruned: list[int]
    experts: list[list[int]]  # per expert: indices into `routed`
    scales: list[list[float]]  # per expert: the gate value of each listed block
    shared_scale: list[list[float]]  # (E, S) the gate value of each shared block in each expert
    padding: list[int] = field(default_factory=list)  # per expert: entries added by uniform padding

    @property
    def expert_sizes(self) -> list[int]:
        return [len(e) for e in self.experts]

    def counts(self) -> dict[str, int]:
        return {"shared": len(self.shared), "routed": len(self.routed), "pruned": len(self.pruned)}

    def to_json(self) -> dict:
        """The block lists as they go into the frozen config's `momcompress` section."""
        return {"shared": self.shared, "routed": self.routed, "pruned": self.pruned, "experts": self.experts, "padding": self.padding}


def plan_layer(gates: torch.Tensor) -> LayerPlan:
    """Classify the blocks of one layer from its fixed gate values (E, N) in [0, 1]."""
    gates = gates.detach().float().cpu()
    on = gates > 0  # (E, N)
    E, N = on.shape
    all_on, any_on = on.all(dim=0), on.any(dim=0)
    shared = all_on.nonzero().flatten().tolist()
    routed = (any_on & ~all_on).nonzero().flatten().tolist()
    pruned = (~any_on).nonzero().flatten().tolist()
    slot = {blk: i for i, blk in enumerate(routed)}
    experts = [[slot[j] for j in routed if on[e, j]] for e in range(E)]
    scales = [[float(gates[e, j]) for j in routed if on[e, j]] for e in range(E)]
    shared_scale = [[float(gates[e, j]) for j in shared] for e in range(E)]
    return LayerPlan(N, shared, routed, pruned, experts, scales, shared_scale, padding=[0] * E)


def pad_uniform(plan: LayerPlan) -> LayerPlan:
    """Pad every expert to the widest one with a zero block (index len(routed), scale 0).

    For runtimes that need equal-width experts. The extra block is all zeros in storage, so a padded
    expert computes exactly what the unpadded one does.
    """
    width = max(plan.expert_sizes, default=0)
    pad_index = len(plan.routed)
    experts = [e + [pad_index] * (width - len(e)) for e in plan.experts]
    scales = [s + [0.0] * (width - len(s)) for s in plan.scales]
    padding = [width - len(e) for e in plan.experts]
    return LayerPlan(plan.num_blocks, plan.shared, plan.routed, plan.pruned, experts, scales, plan.shared_scale, padding)


def padding_overhead(plans: list[LayerPlan]) -> float:
    """Padded expert entries as a fraction of the real ones, over all layers."""
    real = sum(sum(p.expert_sizes) - sum(p.padding) for p in plans)
    pad = sum(sum(p.padding) for p in plans)
    return pad / real if real else 0.0


@torch.no_grad()
def repack_layer(
    mlp: nn.Module, router_weight: torch.Tensor, plan: LayerPlan, top_k: int, block_size: int, activation: str, routing: str = "renormalized"
):
    """Build the FrozenMoMFFN of one layer from a gated FFN (gate/up/down), its router, plan and activation
    (one of momcompress.runtime.mom_ffn.ACTIVATIONS)."""
    from momcompress.runtime.mom_ffn import FrozenMoMFFN

    b = block_size
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # (F, d), (F, d), (d, F)
    d = wg.shape[1]
    padded = any(plan.padding)
    num_routed = len(plan.routed) + (1 if padded else 0)
    module = FrozenMoMFFN(
        d, b, plan.num_blocks, top_k, len(plan.shared), num_routed, plan.expert_sizes, activation, dtype=wg.dtype, device=wg.device,
        routing=routing,
    )

    def rows(blocks: list[int]) -> torch.Tensor:
        return (torch.tensor(blocks, dtype=torch.int64).unsqueeze(1) * b + torch.arange(b)).flatten().to(wg.device)

    shared_rows, routed_rows = rows(plan.shared), rows(plan.routed)
    module.router_weight.copy_(router_weight.float())
    module.shared_gate.copy_(wg.index_select(0, shared_rows))
    module.shared_up.copy_(wu.index_select(0, shared_rows))
    module.shared_down.copy_(wd.index_select(1, shared_rows))
    R = len(plan.routed)
    module.routed_gate[:R].copy_(wg.index_select(0, routed_rows).view(R, b, d))
    module.routed_up[:R].copy_(wu.index_select(0, routed_rows).view(R, b, d))
    module.routed_down[:R].copy_(wd.index_select(1, routed_rows).T.reshape(R, b, d))
    module.shared_scale.copy_(torch.tensor(plan.shared_scale, dtype=torch.float32).view(len(plan.experts), len(plan.shared)))
    module.expert_blocks.copy_(torch.tensor([i for e in plan.experts for i in e], dtype=torch.int64))
    module.expert_scales.copy_(torch.tensor([s for e in plan.scales for s in e], dtype=torch.float32))
    module.refresh()
    return module
