"""Importance initialisation: routers from k-means clusters of FFN inputs, gates ordered by block energy.

Every gate stays on (log_alpha >= LOG_ALPHA_FULLY_ON), so the model still equals the dense one at
step 0; what the init sets is *which* blocks each expert gives up first as the target falls, and a
router that already separates tokens. Without it all experts start identical and the router gets no
gradient until noise breaks the symmetry (DESIGN.md, lessons of the first runs).
"""

from __future__ import annotations

import torch

from momcompress.learn.gates import LOG_ALPHA_FULLY_ON
from momcompress.learn.mom import MoMFFN, gate_mode

# Spread of the initial log_alpha above the all-on threshold, from least to most important block. Wide
# (vs the ~6.4-wide band where a hard-concrete gate is stochastic) so that, as the projection lowers
# all gates together, only the few near the threshold are noisy while the rest stay saturated on.
INIT_SPREAD = 24.0
# Typical std of router logits across experts after init: peaked enough to route, soft enough to learn.
ROUTER_LOGIT_STD = 2.0


@torch.no_grad()
def collect_ffn_inputs(model, layers: list[MoMFFN], seqs: torch.Tensor, batch_size: int, max_tokens: int):
    """Run the dense model over seqs and return, per layer, (x (n, d) fp32, block energy (n, N) fp32).

    Block energy of token t and block j: sum over the block's neurons of h_tn^2 * ||W_down[:, n]||^2,
    the squared size of what the neuron adds to the FFN output.
    """
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
    out = []
    for layer, chunks in zip(layers, xs):
        x = torch.cat(chunks)[:max_tokens]
        mlp = layer.mlp
        h = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).float()  # (n, F)
        col = mlp.down_proj.weight.float().pow(2).sum(dim=0)  # (F,)
        energy = (h.pow(2) * col).view(len(x), layer.num_blocks, layer.block_size).sum(-1)  # (n, N)
        out.append((x.float(), energy))
    return out


def spherical_kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on unit vectors (cosine). Returns centroids (k, d) of unit norm and labels (n,)."""
    xn = torch.nn.functional.normalize(x, dim=-1)
    # k-means++ seeding.
    first = torch.randint(len(xn), (1,), generator=generator).item()
    cent = [xn[first]]
    for _ in range(1, k):
        sim = (xn @ torch.stack(cent).T).max(dim=1).values
        d2 = (2 - 2 * sim).clamp_min(0) + 1e-12
        cent.append(xn[torch.multinomial(d2, 1, generator=generator).item()])
    c = torch.stack(cent)
    for _ in range(iters):
        labels = (xn @ c.T).argmax(dim=1)
        new = torch.zeros_like(c).index_add_(0, labels, xn)
        empty = new.norm(dim=1) < 1e-8
        new[empty] = c[empty]  # keep an empty cluster's centroid
        c = torch.nn.functional.normalize(new, dim=-1)
    return c, (xn @ c.T).argmax(dim=1)


@torch.no_grad()
def importance_init(model, layers: list[MoMFFN], seqs: torch.Tensor, batch_size: int, max_tokens: int, seed: int, log_alpha_init: float):
    """Set every layer's router and log_alpha from dense activations on calibration tokens."""
    g = torch.Generator().manual_seed(seed)
    base = max(log_alpha_init, LOG_ALPHA_FULLY_ON + 0.1)
    for layer, (x, energy) in zip(layers, collect_ffn_inputs(model, layers, seqs, batch_size, max_tokens)):
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
