"""Expert plans: classify each FFN block as shared, routed or pruned from fixed gate values, and
repack a layer's weights accordingly (DESIGN.md, "Freeze"). Math only: no I/O, no Python loops over
blocks or experts (at b = 1 a 7B layer has 14336 blocks and 64 experts).

A block on (gate value > 0) in every expert is shared, on in none is pruned, otherwise routed. Expert
e owns the routed blocks it has on, with their gate values as scales; a block on in several experts is
stored once and listed by each of them. The lists are flat tensors (CSR layout: offsets, entries),
exactly the `expert_offsets` / `expert_blocks` / `expert_scales` buffers of the frozen layer, so they
are stored in model.safetensors; config.json only carries the counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerPlan:
    """One layer's block classification. Block ids are positions in the original FFN (0..N-1).

    Attributes:
        num_blocks: N.
        shared: (S,) int64 ids of the blocks on in every expert.
        routed: (R,) int64 ids of the routed blocks, in storage order.
        pruned: (P,) int64 ids of the blocks on in no expert.
        expert_offsets: (E+1,) int64; expert e owns entries offsets[e]:offsets[e+1].
        expert_blocks: (nnz,) int64 indices into `routed` (R is the zero padding block, if any).
        expert_scales: (nnz,) fp32 gate value of each listed block in its expert.
        shared_scale: (E, S) fp32 gate value of each shared block in each expert.
        padding: (E,) int64 entries added per expert by uniform padding.
    """

    num_blocks: int
    shared: torch.Tensor
    routed: torch.Tensor
    pruned: torch.Tensor
    expert_offsets: torch.Tensor
    expert_blocks: torch.Tensor
    expert_scales: torch.Tensor
    shared_scale: torch.Tensor
    padding: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.expert_offsets.numel() - 1

    @property
    def expert_sizes(self) -> torch.Tensor:
        """(E,) list length per expert (padding included)."""
        return self.expert_offsets.diff()

    @property
    def padded(self) -> bool:
        return bool(self.padding.any())

    @property
    def num_routed_stored(self) -> int:
        """Routed blocks in storage: the routed ones plus one zero block when experts are padded."""
        return self.routed.numel() + (1 if self.padded else 0)

    def expert_lists(self) -> tuple[list[list[int]], list[list[float]]]:
        """(per-expert routed indices, per-expert scales) as nested lists, for inspection and tests."""
        cuts = self.expert_offsets[1:-1]
        return [t.tolist() for t in self.expert_blocks.tensor_split(cuts)], [t.tolist() for t in self.expert_scales.tensor_split(cuts)]

    def counts(self) -> dict[str, int]:
        return {"shared": self.shared.numel(), "routed": self.routed.numel(), "pruned": self.pruned.numel()}

    def to_json(self) -> dict:
        """What goes into the frozen config's `momcompress` section: counts only (the lists are tensors
        in model.safetensors, the block ids in blocks.safetensors), enough to build the layer's shapes."""
        return {**self.counts(), "routed_stored": self.num_routed_stored, "entries": self.expert_blocks.numel()}

    def block_ids(self, prefix: str) -> dict[str, torch.Tensor]:
        """The original block ids of each class, as tensors named `{prefix}shared` etc. (blocks.safetensors)."""
        return {f"{prefix}shared": self.shared, f"{prefix}routed": self.routed, f"{prefix}pruned": self.pruned}


def plan_layer(gates: torch.Tensor) -> LayerPlan:
    """Classify the blocks of one layer from its fixed gate values (E, N) in [0, 1]."""
    gates = gates.detach().float().cpu()
    on = gates > 0  # (E, N)
    E, N = on.shape
    all_on, any_on = on.all(dim=0), on.any(dim=0)  # (N,)
    shared = all_on.nonzero().flatten()
    routed = (any_on & ~all_on).nonzero().flatten()
    pruned = (~any_on).nonzero().flatten()
    routed_on = on[:, routed]  # (E, R)
    owner, slot = routed_on.nonzero(as_tuple=True)  # row-major: grouped by expert, slots ascending
    sizes = routed_on.sum(dim=1)  # (E,)
    offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    scales = gates[:, routed][owner, slot]  # (nnz,)
    return LayerPlan(N, shared, routed, pruned, offsets, slot, scales, gates[:, shared].contiguous(), torch.zeros(E, dtype=torch.int64))


def pad_uniform(plan: LayerPlan) -> LayerPlan:
    """Pad every expert to the widest one with a zero block (index len(routed), scale 0).

    For runtimes that need equal-width experts. The extra block is all zeros in storage, so a padded
    expert computes exactly what the unpadded one does.
    """
    sizes = plan.expert_sizes  # (E,)
    E, width = sizes.numel(), int(sizes.max()) if sizes.numel() else 0
    owner = torch.repeat_interleave(torch.arange(E), sizes)  # (nnz,)
    pos = torch.arange(plan.expert_blocks.numel()) - plan.expert_offsets[owner]  # position within its expert
    blocks = torch.full((E, width), plan.routed.numel(), dtype=torch.int64)
    scales = torch.zeros(E, width)
    blocks[owner, pos] = plan.expert_blocks
    scales[owner, pos] = plan.expert_scales
    offsets = torch.arange(E + 1, dtype=torch.int64) * width
    return LayerPlan(
        plan.num_blocks, plan.shared, plan.routed, plan.pruned, offsets, blocks.flatten(), scales.flatten(), plan.shared_scale, width - sizes
    )


def padding_overhead(plans: list[LayerPlan]) -> float:
    """Padded expert entries as a fraction of the real ones, over all layers."""
    pad = sum(int(p.padding.sum()) for p in plans)
    real = sum(p.expert_blocks.numel() for p in plans) - pad
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
    d, S, R = wg.shape[1], plan.shared.numel(), plan.routed.numel()
    module = FrozenMoMFFN(
        d, b, plan.num_blocks, top_k, S, plan.num_routed_stored, plan.expert_sizes.tolist(), activation, dtype=wg.dtype, device=wg.device,
        routing=routing,
    )

    def rows(blocks: torch.Tensor) -> torch.Tensor:  # (K,) block ids -> (K*b,) neuron rows
        return (blocks.unsqueeze(1) * b + torch.arange(b)).flatten().to(wg.device)

    shared_rows, routed_rows = rows(plan.shared), rows(plan.routed)
    module.router_weight.copy_(router_weight.float())
    module.shared_gate.copy_(wg.index_select(0, shared_rows))
    module.shared_up.copy_(wu.index_select(0, shared_rows))
    module.shared_down.copy_(wd.index_select(1, shared_rows))
    module.routed_gate[:R].copy_(wg.index_select(0, routed_rows).view(R, b, d))
    module.routed_up[:R].copy_(wu.index_select(0, routed_rows).view(R, b, d))
    module.routed_down[:R].copy_(wd.index_select(1, routed_rows).T.reshape(R, b, d))
    module.shared_scale.copy_(plan.shared_scale.view(plan.num_experts, S))
    module.expert_blocks.copy_(plan.expert_blocks)
    module.expert_scales.copy_(plan.expert_scales)
    module.refresh()
    return module
