"""Accuracy metrics on token windows: loss and perplexity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, seqs: torch.Tensor, batch_size: int = 8) -> float:
    """Perplexity of next-token prediction over packed windows seqs (S, L), each scored on its own."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (B, L-1, V)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    if count == 0:
        raise ValueError("perplexity needs at least one window of two tokens")
    return math.exp(total / count)
