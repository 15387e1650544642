"""Importance initialisation: routers from k-means clusters of FFN inputs, gates ordered by block energy.

Every gate stays on (log_alpha >= LOG_ALPHA_FULLY_ON), so the model still equals the dense one at
step 0; what the init sets is *which* blocks each expert gives up first as the target falls, and a
router that already separates tokens. Without it all experts start identical and the router gets no
gradient until noise breaks the symmetry (DESIGN.md, lessons of the first runs).
"""

from __future__ import annotations

import numpy as np
import torch

from momcompress.learn.gates import LOG_ALPHA_FULLY_ON
from momcompress.learn.mom import MoMFFN, gate_mode

# Spread of the initial log_alpha above the all-on threshold, from least to most important block. Wide
# (vs the ~6.4-wide band where a hard-concrete gate is stochastic) so that, as the projection lowers
# all gates together, only the few near the threshold are noisy while the rest stay saturated on.
INIT_SPREAD = 24.0
# Typical std of router logits across experts after init: peaked enough to route, soft enough to learn.
ROUTER_LOGIT_STD = 2.0
# Rounds of balanced k-means, and calibration tokens used, when grouping neurons into blocks.
BALANCED_ITERS = 6
PERMUTE_TOKENS = 8192


@torch.no_grad()
def collect_ffn_inputs(model, layers: list[MoMFFN], seqs: torch.Tensor, batch_size: int, max_tokens: int) -> list[torch.Tensor]:
    """Run the dense model over seqs and return, per layer, the FFN inputs x (n, d) in fp32."""
    xs: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, args, i=i: xs[i].append(args[0].detach().reshape(-1, args[0].shape[-1]))))
    device = next(model.parameters()).device
    try:
        with gate_mode(model, "dense"):
            seen = 0
            for start in range(0, len(seqs), batch_size):
                batch = seqs[start : start + batch_size].to(device)
                model(input_ids=batch, use_cache=False)
                seen += batch.numel()
                if seen >= max_tokens:
                    break
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(chunks)[:max_tokens].float() for chunks in xs]


@torch.no_grad()
def neuron_contributions(layer: MoMFFN, x: torch.Tensor) -> torch.Tensor:
    """(n, F) |h_tn| * ||W_down[:, n]||: how much neuron n adds to the FFN output of token t."""
    mlp = layer.mlp
    x = x.to(mlp.gate_proj.weight)
    h = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).float()
    return h.abs() * mlp.down_proj.weight.float().norm(dim=0)


def block_energy(contrib: torch.Tensor, block_size: int) -> torch.Tensor:
    """(n, N) squared size of what each block of contiguous neurons adds to each token's output."""
    n, width = contrib.shape
    return contrib.pow(2).view(n, width // block_size, block_size).sum(-1)


def co_activation_order(contrib: torch.Tensor, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """A neuron order (F,) in which every contiguous block holds neurons that are active together.

    Blocks of neighbouring neurons in the checkpoint's order are unrelated, so masking whole blocks
    throws away neurons a token needs with the ones it does not. On SmolLM2-135M (b = 16, half the
    blocks kept per token by an oracle that knows each block's energy) held-out perplexity is 70
    with the checkpoint's order and 54 with this one; the learned init improves alike.
    """
    if block_size == 1 or contrib.shape[1] == block_size:
        return torch.arange(contrib.shape[1])
    labels = balanced_kmeans(contrib[:PERMUTE_TOKENS].T, contrib.shape[1] // block_size, BALANCED_ITERS, generator)
    return labels.argsort(stable=True)


def spherical_kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on unit vectors (cosine). Returns centroids (k, d) of unit norm and labels (n,)."""
    xn = torch.nn.functional.normalize(x, dim=-1)
    # k-means++ seeding; `closest` keeps each point's similarity to its nearest seed so far.
    first = torch.randint(len(xn), (1,), generator=generator).item()
    cent = [xn[first]]
    closest = xn @ xn[first]
    for _ in range(1, k):
        d2 = (2 - 2 * closest).clamp_min(0) + 1e-12
        cent.append(xn[torch.multinomial(d2, 1, generator=generator).item()])
        closest = torch.maximum(closest, xn @ cent[-1])
    c = torch.stack(cent)
    for _ in range(iters):
        labels = (xn @ c.T).argmax(dim=1)
        new = torch.zeros_like(c).index_add_(0, labels, xn)
        empty = new.norm(dim=1) < 1e-8
        new[empty] = c[empty]  # keep an empty cluster's centroid
        c = torch.nn.functional.normalize(new, dim=-1)
    return c, (xn @ c.T).argmax(dim=1)


def balanced_assign(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each of n points to one of E clusters, `capacity` each (n = E * capacity), maximising
    similarity greedily: points with the largest margin between their best and second-best cluster
    choose first, each taking its most similar cluster that still has room. sim: (n, E) -> labels (n,)."""
    s = sim.detach().double().cpu().numpy()
    n, E = s.shape
    if n != E * capacity:
        raise ValueError(f"{n} points do not fill {E} clusters of {capacity}")
    top2 = np.sort(s, axis=1)[:, -2:] if E > 1 else np.concatenate([s, s], axis=1)
    order = np.argsort(-(top2[:, 1] - top2[:, 0]), kind="stable")
    room = np.full(E, capacity)
    labels = np.empty(n, dtype=np.int64)
    for i in order:
        row = np.where(room > 0, s[i], -np.inf)
        c = int(row.argmax())
        labels[i] = c
        room[c] -= 1
    return torch.from_numpy(labels)


def balanced_kmeans(features: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Balanced spherical k-means of the rows of features (n, D) into k equal clusters: labels (n,).

    Seeded with plain spherical k-means, then alternates balanced assignment and centroid updates.
    Used for neuron blocks here and for MoEfication's experts (baselines/moefication.py).
    """
    xn = torch.nn.functional.normalize(features.float(), dim=-1)
    cent, _ = spherical_kmeans(xn, k, iters, generator)  # (k, D)
    capacity = len(xn) // k
    labels = balanced_assign(xn @ cent.T, capacity)
    for _ in range(iters):
        cent = torch.nn.functional.normalize(torch.zeros_like(cent).index_add_(0, labels, xn), dim=-1)
        new = balanced_assign(xn @ cent.T, capacity)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


@torch.no_grad()
def importance_init(
    model, layers: list[MoMFFN], seqs: torch.Tensor, batch_size: int, max_tokens: int, seed: int, log_alpha_init: float, permute: bool = True
):
    """Set every layer's router and log_alpha from dense activations on calibration tokens.

    With permute, first reorder each FFN's neurons so that blocks group co-activating neurons
    (co_activation_order; function-preserving, recorded in the layer's neuron_perm).
    """
    g = torch.Generator().manual_seed(seed)
    base = max(log_alpha_init, LOG_ALPHA_FULLY_ON + 0.1)
    for layer, x in zip(layers, collect_ffn_inputs(model, layers, seqs, batch_size, max_tokens)):
        contrib = neuron_contributions(layer, x)
        if permute:
            perm = co_activation_order(contrib, layer.block_size, g)
            layer.permute_neurons(perm)
            contrib = contrib[:, perm]
        energy = block_energy(contrib, layer.block_size)
        E = layer.num_experts
        if E > 1:
            cent, labels = spherical_kmeans(x, E, iters=15, generator=g)
            logits = x @ cent.T  # (n, E)
            scale = ROUTER_LOGIT_STD / logits.std(dim=1).median().clamp_min(1e-6)
            layer.router.weight.copy_((cent * scale).to(layer.router.weight))
        else:
            labels = torch.zeros(len(x), dtype=torch.long)
        # Mean block energy per cluster, as a share of the cluster's total: (E, N).
        sums = torch.zeros(E, layer.num_blocks).index_add_(0, labels.cpu(), energy.cpu())
        counts = torch.bincount(labels.cpu(), minlength=E).clamp_min(1).unsqueeze(1)
        share = sums / counts
        share = share / share.sum(dim=1, keepdim=True).clamp_min(1e-12)
        empty = torch.bincount(labels.cpu(), minlength=E) == 0
        share[empty] = (energy.mean(0) / energy.mean(0).sum()).cpu()  # an unused expert copies the global order
        # Rank within each expert -> [0, 1]; least important block gets `base`, most important base + spread.
        # (Ranking per layer, not by raw energy across layers: a global energy threshold empties some layers.)
        rank = share.argsort(dim=1).argsort(dim=1).float() / max(layer.num_blocks - 1, 1)
        layer.log_alpha.copy_((base + INIT_SPREAD * rank).to(layer.log_alpha))
