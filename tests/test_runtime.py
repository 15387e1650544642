"""The frozen MoM FFN's CPU paths (momcompress.runtime.mom_ffn, momcompress.kernels.cpu_fused) against the
torch reference, at every block size the runtime supports."""

from __future__ import annotations

import pytest
import torch

from momcompress.kernels import cpu_fused
from momcompress.kernels.reference import routed_experts_decode, routed_experts_grouped
from momcompress.runtime.mom_ffn import FrozenMoMFFN


def random_layer(d=64, F=96, b=4, E=6, k=2, shared_blocks=2, seed=0, activation="silu", dtype=torch.float32):
    """A FrozenMoMFFN with random weights, ragged overlapping experts (the last one empty), fractional scales."""
    g = torch.Generator().manual_seed(seed)
    N = F // b
    R = N - shared_blocks
    lists = [torch.randperm(R, generator=g)[: int(torch.randint(1, R + 1, (1,), generator=g))].tolist() for _ in range(E - 1)] + [[]]
    layer = FrozenMoMFFN(d, b, N, k, shared_blocks, R, [len(x) for x in lists], activation, dtype=dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / d**0.5)
        layer.expert_blocks.copy_(torch.tensor([i for x in lists for i in x], dtype=torch.int64))
        layer.expert_scales.copy_(0.2 + 0.8 * torch.rand(layer.expert_scales.shape, generator=g))
        layer.refresh()
    return layer


@pytest.mark.parametrize("b", [1, 2, 4, 16])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
def test_fused_cpu_kernel_matches_reference(b, k, activation):
    layer = random_layer(F=96 if b < 16 else 192, b=b, k=k, activation=activation, seed=b * 10 + k)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    top_w, top_i = layer.route(x)
    top_i[0] = torch.arange(layer.num_experts - k, layer.num_experts)  # token 0 also gets the empty expert
    args = (layer.routed_gate, layer.routed_up, layer.routed_down, layer.expert_block_scale, activation)
    want = routed_experts_grouped(x, top_w, top_i, *args)
    for T in (1, 5):
        out = torch.zeros(T, 64)
        cpu_fused.routed_experts_rows(
            x[:T], top_w[:T], top_i[:T], layer.expert_offsets, layer.expert_blocks, layer.expert_scales,
            layer.routed_gate, layer.routed_up, layer.routed_down, activation, out,
        )
        torch.testing.assert_close(out, want[:T], atol=2e-6, rtol=1e-5)


def test_frozen_layer_dispatches_by_token_count(monkeypatch):
    """Up to fused_cpu_max_tokens tokens (fp32, CPU) the fused kernel runs, above it the torch paths; the
    output is the same either way; bf16 and gradients take the torch path."""
    layer = random_layer(b=1, F=64)
    calls = []
    real = cpu_fused.routed_experts_rows
    monkeypatch.setattr(cpu_fused, "routed_experts_rows", lambda x, *a: (calls.append(len(x)), real(x, *a))[1])
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for T in (1, layer.fused_cpu_max_tokens, layer.fused_cpu_max_tokens + 1):
            fused = layer(x[:T])
            top_w, top_i = layer.route(x[:T])
            want = layer.shared_forward(x[:T], top_w, top_i) + routed_experts_decode(
                x[:T], top_w, top_i, layer.routed_gate, layer.routed_up, layer.routed_down, layer.expert_block_scale, "silu"
            )
            torch.testing.assert_close(fused, want, atol=2e-6, rtol=1e-5)
        assert calls == [1, layer.fused_cpu_max_tokens]
        layer.fused_cpu_max_tokens = 0
        layer(x[:1])
        assert len(calls) == 2
        layer.fused_cpu_max_tokens = 8
        layer.to(torch.bfloat16)(x[:1].bfloat16())
        assert len(calls) == 2
    layer.float()
    layer(x[:1].requires_grad_())
    assert len(calls) == 2


@pytest.mark.parametrize("b", [1, 4, 16])
def test_union_in_place_equals_gathered_union(b, monkeypatch):
    """The union path multiplies all routed blocks in place when the union covers most of them: same result."""
    from momcompress.kernels import reference

    layer = random_layer(F=192, b=b, k=3, seed=b)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    top_w, top_i = layer.route(x)
    args = (x, top_w, top_i, layer.routed_gate, layer.routed_up, layer.routed_down, layer.expert_block_scale, "silu")
    want = routed_experts_grouped(*args)
    for fraction in (0.0, 2.0):  # always in place, never in place
        monkeypatch.setattr(reference, "UNION_IN_PLACE_FRACTION", fraction)
        torch.testing.assert_close(reference.routed_experts_decode(*args), want, atol=2e-6, rtol=1e-5)
