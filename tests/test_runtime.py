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


@pytest.mark.parametrize("b", [1, 4, 16])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("T", [1, 5, 40])
def test_every_path_gives_the_reference(b, k, T):
    """Each forced path (fused, union, grouped, masked) gives the grouped reference, whatever T and k: the
    masked path weighs every routed row, unselected ones by 0 (both ways of building the weights)."""
    layer = random_layer(F=192, b=b, k=k, E=6 if T < 40 else 12, seed=b + k + T)
    x = torch.randn(T, 64, generator=torch.Generator().manual_seed(5))
    top_w, top_i = layer.route(x)
    want = layer.shared_forward(x, top_w, top_i) + routed_experts_grouped(
        x, top_w, top_i, layer.routed_gate, layer.routed_up, layer.routed_down, layer.expert_block_scale, "silu"
    )
    with torch.no_grad():
        for path in ("fused", "union", "grouped", "masked"):
            if path == "fused" and not cpu_fused.available():
                continue
            layer.path = path
            torch.testing.assert_close(layer(x), want, atol=3e-6, rtol=1e-5, msg=lambda m, p=path: f"{p}: {m}")


def test_auto_path_follows_the_crossovers():
    """auto: the fused kernel up to fused_cpu_max_tokens, masked from masked_min_tokens, union/grouped between."""
    layer = random_layer(b=1, F=64)
    x = torch.randn(64, 64)
    _, top_i = layer.route(x)
    layer.fused_cpu_max_tokens, layer.masked_min_tokens = 2, 16
    with torch.no_grad():
        got = {T: layer.choose_path(x[:T], top_i[:T]) for T in (1, 2, 3, 15, 16, 64)}
    fused = "fused" if cpu_fused.available() else "union"
    assert got == {1: fused, 2: fused, 3: "union", 15: "union", 16: "masked", 64: "masked"}
    assert layer.choose_path(x[:1].bfloat16(), top_i[:1]) == "union"  # the Numba kernel is fp32 only
    layer.path = "fastest"
    with pytest.raises(ValueError, match="path must be one of"):
        layer(x[:2])


def test_masked_path_pads_rows_in_place():
    """The masked path pads the routed rows to ROW_ALIGN with zeros, keeping the parameters' shapes, their
    values and the state dict; a dtype change is noticed and padded again."""
    from momcompress.runtime.mom_ffn import ROW_ALIGN

    layer = random_layer(F=96, b=1, k=2, shared_blocks=3)  # 93 routed rows: not a multiple of 16
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(7))
    layer.path = "masked"
    with torch.no_grad():
        want = layer.shared_forward(x, *layer.route(x)) + routed_experts_grouped(
            x, *layer.route(x), layer.routed_gate, layer.routed_up, layer.routed_down, layer.expert_block_scale, "silu"
        )
        torch.testing.assert_close(layer(x), want, atol=3e-6, rtol=1e-5)
        gate, _, down = layer._aligned
        assert gate.shape[0] % ROW_ALIGN == 0 and gate.shape[0] > 93 and not down[93:].any()
        assert layer.routed_gate.data_ptr() == gate.data_ptr() and layer.routed_gate.shape == (93, 1, 64)
        after = layer.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        layer.double()
        torch.testing.assert_close(layer(x.double()), want.double(), atol=1e-5, rtol=1e-5)
        assert layer._aligned[0].dtype == torch.float64
