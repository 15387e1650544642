"""The MoM layer: equal to the dense model at step 0 for every architecture; the ratio as DESIGN.md defines it."""

import pytest
import torch

from conftest import TINY_ARCHS, tiny_config
from momcompress.learn.gates import prob_nonzero
from momcompress.learn.init import importance_init
from momcompress.learn.mom import gate_mode, mom_layers, tracking
from momcompress.learn.mom import wrap_with_mom
from momcompress.models import check_supported, default_block_size


def _tiny(model_type):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


@pytest.mark.parametrize("model_type", sorted(TINY_ARCHS))
@pytest.mark.parametrize("init", ["uniform", "importance"])
def test_step0_logits_equal_dense(model_type, init):
    model = _tiny(model_type)
    check_supported(model.config)
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    layers = wrap_with_mom(model, num_experts=4, top_k=2, block_size=16)
    if init == "importance":
        importance_init(model, layers, ids, batch_size=2, max_tokens=48, seed=0, log_alpha_init=3.0)
    with torch.no_grad(), gate_mode(model, "deterministic"):
        mom = model(input_ids=ids).logits
    torch.testing.assert_close(mom, dense, rtol=1e-5, atol=1e-5)
    # importance init keeps every gate on but orders them
    for m in layers:
        assert (m.log_alpha > 2.398).all()
        if init == "importance":
            assert m.log_alpha.std() > 0
            # blocks are cut from a co-activation order of the neurons (function-preserving)
            assert m.neuron_perm is not None and not torch.equal(m.neuron_perm, torch.arange(len(m.neuron_perm)))


def test_routing_weights_renormalised_over_top_k():
    model = _tiny("llama")
    (layer, *_) = wrap_with_mom(model, num_experts=6, top_k=3, block_size=16)
    x = torch.randn(5, 7, 64)
    probs, top_w, top_i = layer.route(x)
    assert top_w.shape == (5, 7, 3) and top_i.shape == (5, 7, 3)
    torch.testing.assert_close(top_w.sum(-1), torch.ones(5, 7))
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, 7))


def test_block_weight_formula_and_expected_ratio_by_hand():
    model = _tiny("llama")
    layer = wrap_with_mom(model, num_experts=3, top_k=2, block_size=32)[0]  # F=128 -> N=4
    with torch.no_grad():
        layer.log_alpha.copy_(torch.tensor([[5.0, 5.0, -5.0, 0.0], [5.0, -5.0, -5.0, 1.0], [-5.0, 5.0, 5.0, -1.0]]))
    x = torch.randn(1, 4, 64)
    probs, top_w, top_i = layer.route(x)
    with tracking(model), gate_mode(model, "sample"):
        layer.generator = torch.Generator().manual_seed(0)
        layer(x)
        stats = layer.last_stats
    p = prob_nonzero(layer.log_alpha.detach())  # (E, N)
    by_hand = torch.stack(
        [(1 - (1 - p[top_i[0, t, 0]]) * (1 - p[top_i[0, t, 1]])).mean() for t in range(4)]
    ).mean()
    assert stats.ratio.item() == pytest.approx(by_hand.item(), rel=1e-6)
    # output: W_down((act(W_g x) * W_u x) * expand(w)), w = sum_k r z[e]
    mlp = layer.mlp
    with gate_mode(model, "deterministic"):
        y = layer(x)
    zd = (torch.sigmoid(layer.log_alpha) * 1.2 - 0.1).clamp(0, 1).detach()
    w = (top_w.unsqueeze(-1) * zd[top_i]).sum(-2)  # (1, 4, N)
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    ref = mlp.down_proj(h * w.repeat_interleave(32, dim=-1))
    torch.testing.assert_close(y, ref)


def test_ratio_gradient_does_not_vanish_for_gates_that_start_on():
    model = _tiny("llama")
    layers = wrap_with_mom(model, num_experts=4, top_k=2, block_size=16, log_alpha_init=6.0)
    for m in layers:
        m.ratio_grad_temperature = 4.0
    ids = torch.randint(3, 256, (2, 16))
    with tracking(model), gate_mode(model, "sample"):
        model(input_ids=ids)
        ratio = torch.stack([m.last_stats.ratio for m in layers]).mean()
    ratio.backward()
    g = torch.stack([m.log_alpha.grad.abs().mean() for m in layers]).mean()
    assert g > 1e-5


def test_dense_mode_bypasses_gates():
    model = _tiny("llama")
    ids = torch.randint(3, 256, (1, 10))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    layers = wrap_with_mom(model, num_experts=2, top_k=1, block_size=16)
    for m in layers:
        torch.nn.init.constant_(m.log_alpha, -10.0)
    with torch.no_grad(), gate_mode(model, "dense"):
        torch.testing.assert_close(model(input_ids=ids).logits, dense)
    with torch.no_grad(), gate_mode(model, "deterministic"):
        assert not torch.allclose(model(input_ids=ids).logits, dense)
    assert len(mom_layers(model)) == 2


@pytest.mark.parametrize("width,expected", [(1536, 16), (14336, 64), (8192, 64), (128, 8), (96, 8)])
def test_default_block_size(width, expected):
    b = default_block_size(width)
    assert width % b == 0 and b == expected


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_gets_task_gradient(top_k):
    model = _tiny("llama")
    layers = wrap_with_mom(model, num_experts=4, top_k=top_k, block_size=16)
    for m in layers:  # half the gates off so routing matters
        with torch.no_grad():
            m.log_alpha.copy_(torch.randn(m.log_alpha.shape) * 5)
    ids = torch.randint(3, 256, (2, 16))
    with gate_mode(model, "deterministic"):
        model(input_ids=ids).logits.pow(2).mean().backward()
    assert all(m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0 for m in layers)
    # values are unchanged by the straight-through term
    with torch.no_grad():
        _, w, _ = layers[0].route(torch.randn(3, 64))
    torch.testing.assert_close(w.sum(-1), torch.ones(3))


def test_permute_neurons_preserves_the_ffn_and_composes():
    model = _tiny("qwen3")
    (layer, *_) = wrap_with_mom(model, num_experts=2, top_k=1, block_size=16)
    layer.freeze_reference()
    x = torch.randn(3, 5, 64)
    with torch.no_grad(), gate_mode(model, "deterministic"):
        before = layer(x)
        g = torch.Generator().manual_seed(1)
        p1, p2 = torch.randperm(128, generator=g), torch.randperm(128, generator=g)
        w0 = layer.mlp.gate_proj.weight.clone()
        layer.permute_neurons(p1)
        layer.permute_neurons(p2)
        torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.neuron_perm, p1[p2])
    assert torch.equal(layer.mlp.gate_proj.weight, w0[p1[p2]])
    assert torch.equal(layer.reference_mlp.gate_proj.weight, w0[p1[p2]])  # the teacher follows
    with pytest.raises(ValueError, match="reorder all 128"):
        layer.permute_neurons(torch.zeros(128, dtype=torch.long))


def test_co_activation_order_recovers_planted_groups():
    from momcompress.learn.init import balanced_kmeans, co_activation_order

    g = torch.Generator().manual_seed(0)
    groups, size, tokens = 8, 4, 200
    # each planted group of neurons fires on its own random subset of tokens; neurons are shuffled
    fire = (torch.rand(groups, tokens, generator=g) < 0.2).float()
    profiles = fire.repeat_interleave(size, 0) * (1 + 0.1 * torch.rand(groups * size, tokens, generator=g))
    shuffle = torch.randperm(groups * size, generator=g)
    planted = torch.arange(groups).repeat_interleave(size)[shuffle]
    contrib = profiles[shuffle].T  # (tokens, F)
    assign = balanced_kmeans(contrib.T, groups, 6, torch.Generator().manual_seed(0))
    assert torch.bincount(assign, minlength=groups).tolist() == [size] * groups
    order = co_activation_order(contrib, size, torch.Generator().manual_seed(0))
    blocks = planted[order].view(groups, size)
    assert (blocks == blocks[:, :1]).all()  # every block holds one planted group
