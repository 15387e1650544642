"""Training losses on the LM head, computed chunk by chunk without keeping (T, V) logits for backward.

The distillation loss is KL(teacher || student) per token over the whole vocabulary, optionally plus
the LM cross-entropy. For a small model the LM head dominates the memory (SmolLM2-135M: 49152 x 576,
so 1024 tokens give 50M logits), and autograd would keep the logits, their softmax and their
log-softmax alive until backward. `head_losses` instead computes, per chunk of tokens, the logits,
the losses and straight away the gradient with respect to the hidden states (T, d); backward only
scales that gradient. The head weight is frozen, so no gradient for it is needed.

Pure math: no model code, no I/O.
"""

from __future__ import annotations

import torch

# Tokens per chunk of the head: (CHUNK, V) fp32 temporaries, 50 MB each for V = 49152; a chunk that
# stays near the L3 cache beat one pass over all 1024 tokens (bf16 b=1 step: ~5.7 s with 128 or 256, 6.6 s).
HEAD_CHUNK = 256
IGNORE_INDEX = -100


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Logits (..., V) of hidden states (..., d) through a head weight (V, d), with Gemma-2-style soft-capping."""
    logits = hidden.to(weight.dtype) @ weight.T
    if softcap:
        logits = torch.tanh(logits.to(torch.promote_types(logits.dtype, torch.float32)) / softcap) * softcap
    return logits


class _HeadLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher, labels, kd_weight, lm_weight, softcap, chunk):
        T = hidden.shape[0]
        acc = torch.promote_types(weight.dtype, torch.float32)  # softmax math in fp32 (fp64 in tests)
        grad = torch.empty(hidden.shape, dtype=weight.dtype, device=hidden.device)
        kd_sum = torch.zeros((), dtype=acc, device=hidden.device)
        lm_sum = torch.zeros((), dtype=acc, device=hidden.device)
        n_lm = int((labels != IGNORE_INDEX).sum()) if labels is not None else 0
        use_kd = teacher is not None and kd_weight != 0.0
        use_lm = labels is not None and lm_weight != 0.0 and n_lm > 0
        for i in range(0, T, chunk):
            s = head_logits(hidden[i : i + chunk], weight, softcap).to(acc)  # (c, V) student logits
            cap = s / softcap if softcap else None  # tanh(raw / softcap), for the chain rule below
            lse = torch.logsumexp(s, dim=-1, keepdim=True)  # (c, 1)
            if use_kd:
                t = teacher[i : i + chunk].to(acc)
                t_logp = t - torch.logsumexp(t, dim=-1, keepdim=True)
                t_p = t_logp.exp()
                # KL = sum t_p (t_logp - s + lse) = sum t_p t_logp - sum t_p s + lse (sum t_p = 1)
                kd_sum += (t_p * t_logp).sum() - (t_p * s).sum() + lse.sum()
            if use_lm:
                lab = labels[i : i + chunk]
                rows = torch.nonzero(lab != IGNORE_INDEX).squeeze(1)
                lm_sum += (lse[rows, 0] - s[rows, lab[rows]]).sum()
            # d loss / d s = coef * softmax(s) - (kd_weight / T) t_p - (lm_weight / n_lm) onehot(label),
            # coef = kd_weight / T + lm_weight / n_lm on rows with a label (kd_weight / T without one).
            dz = s.sub_(lse).exp_()  # softmax of the student, in place of its logits
            coef = torch.full((len(dz), 1), kd_weight / T if use_kd else 0.0, dtype=acc, device=dz.device)
            if use_lm:
                coef[rows] += lm_weight / n_lm
            dz.mul_(coef)
            if use_kd:
                dz.sub_(t_p, alpha=kd_weight / T)
            if use_lm:
                dz[rows, lab[rows]] -= lm_weight / n_lm
            if softcap:
                dz.mul_(1.0 - cap * cap)  # d(c tanh(x / c)) / dx
            grad[i : i + chunk] = dz.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        kd = kd_sum / T
        lm = lm_sum / max(n_lm, 1)
        loss = kd_weight * kd + lm_weight * lm
        ctx.mark_non_differentiable(kd, lm)
        return loss, kd, lm

    @staticmethod
    def backward(ctx, g_loss, _g_kd, _g_lm):
        (grad,) = ctx.saved_tensors
        return (grad * g_loss).to(ctx.hidden_dtype), None, None, None, None, None, None, None


def head_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    kd_weight: float = 1.0,
    lm_weight: float = 0.0,
    softcap: float | None = None,
    chunk: int = HEAD_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distillation and LM losses of hidden states through a frozen LM head.

    Args:
        hidden: (T, d) final hidden states (after the final norm), with grad.
        weight: (V, d) frozen head weight.
        teacher_logits: (T, V) teacher logits (any float dtype; bf16 halves their memory), or None.
        labels: (T,) next-token ids (IGNORE_INDEX where none), or None.
        kd_weight, lm_weight: weights of KL(teacher || student) and of the cross-entropy.
        softcap: final logit soft-capping of the model (Gemma 2/3), or None.
    Returns:
        (loss, kd, lm): loss = kd_weight * kd + lm_weight * lm (differentiable in hidden); kd and lm
        are the per-token means (0 when not computed), for reporting.
    """
    if teacher_logits is None and labels is None:
        raise ValueError("head_losses needs teacher logits, labels or both")
    return _HeadLosses.apply(hidden, weight.detach(), teacher_logits, labels, float(kd_weight), float(lm_weight), softcap, chunk)
