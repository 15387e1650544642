"""The chunked head losses equal autograd through full logits: values and gradients, every mix of terms."""

import pytest
import torch
import torch.nn.functional as F

from momcompress.learn.losses import IGNORE_INDEX, head_logits, head_losses


def _reference(hidden, weight, teacher, labels, kd_w, lm_w, softcap):
    logits = hidden @ weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logp = F.log_softmax(logits, dim=-1)
    kd = lm = torch.zeros(())
    if teacher is not None:
        t = F.log_softmax(teacher, dim=-1)
        kd = (t.exp() * (t - logp)).sum(-1).mean()
    if labels is not None:
        lm = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    return kd_w * kd + lm_w * lm, kd, lm


@pytest.mark.parametrize("kd_w,lm_w", [(1.0, 0.0), (0.0, 1.0), (1.0, 0.3)])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk", [3, 64])
def test_head_losses_match_autograd(kd_w, lm_w, softcap, chunk):
    g = torch.Generator().manual_seed(0)
    T, d, V = 11, 8, 37
    weight = torch.randn(V, d, generator=g, dtype=torch.float64)
    hidden = torch.randn(T, d, generator=g, dtype=torch.float64)
    teacher = torch.randn(T, V, generator=g, dtype=torch.float64) * 2 if kd_w else None
    labels = torch.randint(0, V, (T,), generator=g) if lm_w else None
    if labels is not None:
        labels[[2, 7]] = IGNORE_INDEX  # rows without a next token
    h_ref = hidden.clone().requires_grad_(True)
    ref, ref_kd, ref_lm = _reference(h_ref, weight, teacher, labels, kd_w, lm_w, softcap)
    ref.backward()
    h = hidden.clone().requires_grad_(True)
    loss, kd, lm = head_losses(h, weight, teacher, labels, kd_weight=kd_w, lm_weight=lm_w, softcap=softcap, chunk=chunk)
    (2.0 * loss).backward()  # the saved gradient is scaled by the upstream one
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(kd, ref_kd.detach() if kd_w else torch.zeros((), dtype=kd.dtype), check_dtype=False)
    torch.testing.assert_close(lm, ref_lm.detach() if lm_w else torch.zeros((), dtype=lm.dtype), check_dtype=False)
    torch.testing.assert_close(h.grad, 2.0 * h_ref.grad)


def test_kd_is_zero_for_the_teacher_itself_and_positive_otherwise():
    g = torch.Generator().manual_seed(1)
    weight, hidden = torch.randn(50, 6, generator=g), torch.randn(9, 6, generator=g)
    teacher = head_logits(hidden, weight, None)
    _, kd, _ = head_losses(hidden, weight, teacher)
    assert abs(kd.item()) < 1e-5
    _, kd_other, _ = head_losses(hidden + 0.5 * torch.randn(9, 6, generator=g), weight, teacher)
    assert kd_other.item() > 1e-3


def test_head_losses_needs_a_target():
    with pytest.raises(ValueError, match="teacher logits, labels"):
        head_losses(torch.zeros(2, 3), torch.zeros(4, 3))
