"""Layer-wise phase of `learn`: each MoM FFN is matched to the dense FFN on cached inputs.

As one-shot pruners do (SparseGPT, Wanda: one layer at a time on calibration activations), the
phase needs no teacher forward and no LM head: the dense model runs once over a pool of calibration
tokens, every layer's FFN inputs x and dense outputs y are cached (in the compute dtype), and each
step trains the gates and routers of all layers at once to minimise the relative error
||MoM(x) - y||^2 / ||y||^2 on a random batch of cached tokens. The FFN weights stay fixed in this
phase (their tuning needs the end-to-end loss), so a step reads each FFN once forward and once
backward for the gate gradient: several times cheaper than an end-to-end step on the same tokens.
The ratio follows the same schedule and projection as end to end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from momcompress.learn.mom import MoMFFN, gate_mode


@dataclass
class ActivationPool:
    """Cached FFN inputs and dense outputs of every layer: xs[l], ys[l] of shape (P, d)."""

    xs: list[torch.Tensor]
    ys: list[torch.Tensor]

    @property
    def size(self) -> int:
        return len(self.xs[0])


@torch.no_grad()
def collect_pool(model, layers: list[MoMFFN], seqs: torch.Tensor, batch_size: int, dtype: torch.dtype) -> ActivationPool:
    """Run the dense model over seqs (S, L) and cache every FFN's input and dense output (S * L, d)."""
    xs: list[list[torch.Tensor]] = [[] for _ in layers]
    ys: list[list[torch.Tensor]] = [[] for _ in layers]

    def hook(i):
        def fn(module, args, output):
            xs[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).to(dtype))
            ys[i].append(output.detach().reshape(-1, output.shape[-1]).to(dtype))

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        with gate_mode(model, "dense"):
            for start in range(0, len(seqs), batch_size):
                model.model(input_ids=seqs[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return ActivationPool([torch.cat(x) for x in xs], [torch.cat(y) for y in ys])


def pool_batch(pool: ActivationPool, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Row indices (tokens,) of one layer-wise batch, the same rows for every layer."""
    return torch.randperm(pool.size, generator=generator)[: min(tokens, pool.size)]


def layerwise_loss(layers: list[MoMFFN], pool: ActivationPool, rows: torch.Tensor) -> torch.Tensor:
    """Mean over layers of ||MoM(x) - y||^2 / ||y||^2 on the pool's rows (gates in the caller's mode)."""
    total = 0.0
    for layer, x, y in zip(layers, pool.xs, pool.ys):
        dev = layer.log_alpha.device
        xb, yb = x[rows].to(dev), y[rows].to(dev).float()
        out = layer(xb).float()
        total = total + (out - yb).pow(2).sum() / yb.pow(2).sum().clamp_min(1e-12)
    return total / len(layers)
