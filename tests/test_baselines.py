"""`baseline`: MoEfication, static pruning and TEAL baselines on tiny models: each meets its target ratio
(measured with the loaded model's track_stats), the neuron permutation keeps the dense output, TEAL's
thresholds read the asked fraction, folders load and generate, and bad input gets a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import momcompress
from conftest import make_tiny_model_dir
from momcompress.baselines.base import BaselineConfig, baseline, calibration_and_heldout, measure_ratio
from momcompress.baselines.moefication import choose_experts, expert_permutation, train_router
from momcompress.baselines.teal import KEEP_ALL, TealFFN, calibrate, magnitude_threshold, read_fraction, teal_layers
from momcompress.cli import main
from momcompress.freeze.plan import plan_layer, repack_layer
from momcompress.learn.init import balanced_kmeans
from momcompress.models import decoder_layers, load_model, permute_ffn
from momcompress.runtime.mom_ffn import FrozenMoMFFN, frozen_layers

TINY = dict(tokens=2048, eval_tokens=512, seq_len=32, batch_size=8, block_size=8)  # tiny FFN: 128 neurons = 16 blocks


def _config(data, **kw):
    return BaselineConfig(**{**TINY, "data": str(data), **kw})


def _generate(model, ids=(5, 6, 7)) -> torch.Tensor:
    return model.generate(torch.tensor([list(ids)]), max_new_tokens=4, do_sample=False, pad_token_id=0)


# -- moefication math ---------------------------------------------------------------------------------
def test_choose_experts_meets_the_target_on_whole_blocks():
    assert choose_experts(96, 0.5) == (16, 8)  # the preferred 16 when it meets the target exactly
    assert choose_experts(96, 0.3) == (96, 29)  # 29/96 = 0.302: the only E within 0.005 of 0.3
    assert choose_experts(16, 0.25) == (16, 4)
    assert choose_experts(6, 0.5) == (6, 3)
    assert choose_experts(96, 0.5, experts=8) == (8, 4)
    with pytest.raises(momcompress.MomcompressError, match="must divide the 96"):
        choose_experts(96, 0.5, experts=10)


def test_balanced_kmeans_gives_equal_clusters_that_follow_the_data():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 32) * 5  # 4 well separated directions
    truth = torch.arange(4).repeat_interleave(8)  # (32,) 8 points each
    points = centres[truth] + 0.3 * torch.randn(32, 32, generator=g)
    labels = balanced_kmeans(points, 4, iters=10, generator=torch.Generator().manual_seed(1))
    assert torch.bincount(labels, minlength=4).tolist() == [8, 8, 8, 8]
    for c in range(4):  # each true group lands in one cluster
        assert len(labels[truth == c].unique()) == 1
    # unbalanced data still gives equal sizes
    skew = torch.cat([centres[0] + 0.1 * torch.randn(20, 32, generator=g), centres[1] + 0.1 * torch.randn(12, 32, generator=g)])
    assert torch.bincount(balanced_kmeans(skew, 4, 10, torch.Generator().manual_seed(0)), minlength=4).tolist() == [8, 8, 8, 8]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_permutation_keeps_the_dense_output(arch, tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / arch, arch)
    model, _ = load_model(model_dir)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        before = decoder_layers(model)[0].mlp.gate_proj.weight.clone()
        for i, layer in enumerate(decoder_layers(model)):
            labels = torch.randint(0, 4, (128,), generator=torch.Generator().manual_seed(i))
            permute_ffn(layer.mlp, expert_permutation(labels))
        got = model(ids).logits
    assert not torch.equal(decoder_layers(model)[0].mlp.gate_proj.weight, before)  # the weights did move
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_expert_permutation_makes_experts_contiguous_and_all_experts_give_the_dense_ffn():
    torch.manual_seed(0)
    from transformers.activations import ACT2FN

    mlp = torch.nn.Module()
    mlp.gate_proj, mlp.up_proj = torch.nn.Linear(16, 64, bias=False), torch.nn.Linear(16, 64, bias=False)
    mlp.down_proj, mlp.act_fn = torch.nn.Linear(64, 16, bias=False), ACT2FN["silu"]
    x = torch.randn(7, 16)
    dense = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    labels = torch.arange(64) % 4  # interleaved experts of 16 neurons
    perm = expert_permutation(labels)
    assert labels[perm].tolist() == [e for e in range(4) for _ in range(16)]
    permute_ffn(mlp, perm)
    gates = torch.zeros(4, 8)  # 8 blocks of 8 neurons, expert e = blocks 2e, 2e+1
    for e in range(4):
        gates[e, 2 * e : 2 * e + 2] = 1
    plan = plan_layer(gates)
    assert plan.shared.numel() == 0 and plan.pruned.numel() == 0 and plan.expert_lists()[0] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    router = torch.randn(4, 16)
    every = repack_layer(mlp, router, plan, 4, 8, "silu", routing="unit")  # all experts, weight 1 each: the dense FFN
    with torch.no_grad():
        assert (every(x) - dense).abs().max() <= 1e-5 * dense.abs().max()
        two = repack_layer(mlp, router, plan, 2, 8, "silu", routing="unit")
        two.track_stats = True
        two(x)
    assert torch.allclose(two.last_ratio, torch.full((7,), 0.5))  # 2 of 4 disjoint experts: half the blocks


def test_router_learns_which_experts_carry_the_mass():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 24, generator=g) * torch.linspace(0.1, 10, 24)  # badly scaled channels
    proj = torch.randn(24, 6, generator=g)
    mass = torch.nn.functional.softplus(x @ proj / x.std(0).mean())  # (T, 6) a monotone function of a linear score
    router, quality = train_router(x, mass, top_k=2, seed=0)
    assert router.shape == (6, 24)
    assert quality["recall"] > 0.9 and quality["mass_captured"] > 0.95
    _, chance = train_router(x, mass[torch.randperm(4000, generator=g)], top_k=2, seed=0)  # labels unrelated to x
    assert chance["recall"] < 0.6


# -- TEAL math ----------------------------------------------------------------------------------------
def test_magnitude_threshold_keeps_the_asked_fraction():
    v = torch.tensor([-0.9, 0.1, 0.5, -0.3, 0.7, 0.2, -0.6, 0.4, 0.8, -1.0])
    for keep in (0.1, 0.3, 0.5, 0.9):
        t = magnitude_threshold(v, keep)
        assert int((v.abs() > t).sum()) == round(keep * 10)
    assert magnitude_threshold(v, 1.0) == KEEP_ALL
    assert int((v.abs() > magnitude_threshold(v, 0.0)).sum()) == 0
    assert read_fraction(0.5, 0.5) == 0.5 and read_fraction(1.0, 0.0) == pytest.approx(2 / 3)


@pytest.mark.parametrize("split", ["search", "equal"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_teal_thresholds_read_the_target_fraction_on_calibration_tokens(arch, split, tmp_path, text_data):
    model, tok = load_model(make_tiny_model_dir(tmp_path / arch, arch))
    calib, _ = calibration_and_heldout(tok, _config(text_data), 2048)
    records = calibrate(model, calib, 0.4, split)
    assert len(teal_layers(model)) == len(records) == 2
    for r in records:
        assert read_fraction(r["x_kept"], r["h_kept"]) == pytest.approx(0.4, abs=1e-9)
        if split == "equal":
            assert r["x_kept"] == r["h_kept"] == 0.4
    _, per_layer, _ = measure_ratio(model, calib, 8)
    assert per_layer == pytest.approx([0.4, 0.4], abs=2e-3)
    x = torch.randn(5, 64)  # with thresholds that keep everything, the layer is the dense FFN
    m = teal_layers(model)[0]
    m.x_threshold.fill_(KEEP_ALL)
    m.h_threshold.fill_(KEEP_ALL)
    with torch.no_grad():
        assert torch.allclose(m(x), m.dense_forward(x), atol=1e-6)


# -- end to end -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The three baselines of one tiny llama, built once: {method: (folder, manifest)}."""
    from conftest import write_text_data

    root = tmp_path_factory.mktemp("baselines")
    model_dir = make_tiny_model_dir(root / "model", "llama")
    data = write_text_data(root / "calib.txt")
    out = {"model": model_dir, "data": data}
    for method in ("moefication", "teal"):
        out[method] = (root / method, baseline(method, model_dir, root / method, _config(data)))
    cfg = _config(data, tokens=None, steps=3, learn_options={"batch_size": 2, "init_tokens": 256, "log_every": 100})
    out["prune"] = (root / "prune", baseline("prune", model_dir, root / "prune", cfg))
    return out


@pytest.mark.parametrize("method", ["moefication", "prune", "teal"])
def test_baseline_meets_its_target_and_records_it(built, method):
    folder, manifest = built[method]
    assert manifest["stage"] == "baseline" and manifest["method"] == method
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk["measured_ratio"] == manifest["measured_ratio"]
    section = json.loads((folder / "config.json").read_text())["momcompress"]
    assert section["method"] == method
    model = momcompress.load(folder)
    tok = load_model(built["model"])[1]
    _, heldout = calibration_and_heldout(tok, _config(built["data"]), 2048)
    ratio, _, ppl = measure_ratio(model, heldout, 8)  # the loaded model's own track_stats
    assert ratio == pytest.approx(manifest["measured_ratio"], abs=1e-6)
    if method != "prune":  # (prune's perplexity is measured by freeze on learn's own held-out split)
        assert ppl == pytest.approx(manifest["perplexity"]["baseline"], rel=1e-5)
    assert abs(ratio - 0.5) <= 0.01 and manifest["ratio_note"] is None
    assert manifest["heldout_tokens"] == heldout.numel() == manifest["perplexity"]["tokens"]
    assert manifest["calibration"]["tokens"] > 0 and manifest["calibration"]["wall_seconds"] > 0
    p = manifest["parameters"]
    assert p["ffn_active_per_token"] < p["dense_ffn_active_per_token"] and p["model_active_per_token"] < p["dense_model_active_per_token"]
    assert manifest["perplexity"]["baseline"] > 0 and manifest["perplexity"]["dense"] > 0
    assert _generate(model).shape == (1, 7)


def test_moefication_folder_is_a_partition_with_unit_routing(built):
    folder, manifest = built["moefication"]
    model = momcompress.load(folder)
    layers = frozen_layers(model)
    assert len(layers) == 2 and all(m.routing == "unit" for m in layers)
    section = json.loads((folder / "config.json").read_text())["momcompress"]
    assert (section["num_experts"], section["top_k"]) == (16, 8)  # 16 blocks: 16 experts of one block, top-8
    for layer in section["layers"]:
        assert layer["shared"] == 0 and layer["pruned"] == 0 and layer["routed"] == 16 and layer["entries"] == 16
    for m in layers:  # every routed block in exactly one expert: a partition
        assert sorted(m.expert_blocks.tolist()) == list(range(16)) and m.expert_offsets.diff().tolist() == [1] * 16
    assert manifest["blocks"]["total"] == {"shared": 0, "routed": 32, "pruned": 0}
    assert manifest["details"]["router_recall"] > 8 / 16  # better than a random top-8 of 16 experts
    # the rule every method follows: fit on calibration tokens within ±0.01 (k / E = 8 / 16 exactly)
    assert manifest["fit_ratio"] == pytest.approx(0.5, abs=1e-6) and "fails" in manifest["ratio_rule"]


def test_router_quality_by_hand():
    from momcompress.baselines.moefication import router_quality

    mass = torch.tensor([[5.0, 3.0, 1.0, 0.0], [0.0, 1.0, 2.0, 6.0]])  # (T=2, E=4): true top-2 {0, 1} and {3, 2}
    x = torch.eye(2)  # token t's router logits are router[:, t]
    router = torch.tensor([[9.0, 0.0], [0.0, 0.0], [8.0, 1.0], [0.0, 9.0]])  # picks {0, 2} and {3, 2}
    q = router_quality(router, x, mass, top_k=2)
    assert q["recall"] == pytest.approx(3 / 4)  # 1 of 2, then 2 of 2 true experts found
    assert q["mass_captured"] == pytest.approx(((5 + 1) / 8 + (6 + 2) / 8) / 2)


def test_prune_folder_has_only_shared_and_pruned_blocks(built):
    folder, manifest = built["prune"]
    layers = frozen_layers(momcompress.load(folder))
    assert all(m.num_experts == 1 and m.routed_gate.shape[0] == 0 for m in layers)
    total = manifest["blocks"]["total"]
    assert total["routed"] == 0 and total["shared"] == 16 and total["pruned"] == 16  # half of 2 x 16 blocks
    assert manifest["learn_config"]["experts"] == 1 and manifest["learn_config"]["steps"] == 3
    assert manifest["calibration"]["tokens"] == 3 * 2 * 32
    assert not list(folder.parent.glob(".prune*")) and not list(folder.parent.glob("*.prune-*"))  # temporary run removed


def test_teal_folder_keeps_dense_weights_and_reloads_exactly(built):
    folder, manifest = built["teal"]
    dense_keys = set(load_file(built["model"] / "model.safetensors"))
    assert set(load_file(folder / "model.safetensors")) == dense_keys - {"lm_head.weight"}  # tied embedding stored once
    section = json.loads((folder / "config.json").read_text())["momcompress"]
    model = momcompress.load(folder)
    for m, record in zip(teal_layers(model), section["layers"]):
        assert isinstance(m, TealFFN) and float(m.x_threshold) == pytest.approx(record["x_threshold"])
    assert not any(isinstance(m, FrozenMoMFFN) for m in model.modules())


# -- CLI and bad input --------------------------------------------------------------------------------
def _cli(*args):
    return CliRunner().invoke(main, ["baseline", *map(str, args)])


def test_cli_builds_and_refuses_to_overwrite(tiny_llama_dir, text_data, tmp_path):
    out = tmp_path / "teal"
    args = ["teal", tiny_llama_dir, "-o", out, "--data", text_data, "--tokens", 1024, "--eval-tokens", 256, "--seq-len", 32, "--split", "equal"]
    res = _cli(*args)
    assert res.exit_code == 0, res.output
    assert "measured ratio" in res.output and "held-out perplexity" in res.output and (out / "manifest.json").is_file()
    res = _cli(*args)
    assert res.exit_code == 1 and "exists" in res.output and "--overwrite" in res.output
    assert _cli(*args, "--overwrite").exit_code == 0


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["sparsegpt", "{model}", "-o", "{out}"], 2, "sparsegpt"),
        (["teal", "{model}", "-o", "{out}", "--target", "1.5"], 2, "--target"),
        (["teal", "{model}", "-o", "{out}", "--target", "0"], 2, "--target"),
        (["moefication", "{missing}", "-o", "{out}"], 1, "does not exist"),
        (["moefication", "{model}", "-o", "{out}", "--data", "{data}", "--experts", "3", "--block-size", "8", "--seq-len", "32", "--eval-tokens", "64", "--tokens", "256"], 1, "must divide the 16"),
        # the ratio rule (as MoM's freeze): k / E = 2/4 cannot meet 0.4 within ±0.01, so the build fails, no note
        (["moefication", "{model}", "-o", "{out}", "--data", "{data}", "--experts", "4", "--block-size", "8", "--target", "0.4", "--seq-len", "32",
          "--eval-tokens", "64", "--tokens", "256"], 1, "moefication cannot meet target 0.400 within ±0.01: the nearest achievable ratio on the calibration tokens is 0.5000"),
    ],
)
def test_cli_rejects_bad_input(args, code, message, tiny_llama_dir, text_data, tmp_path):
    fill = {"model": tiny_llama_dir, "out": tmp_path / "out", "missing": tmp_path / "nope", "data": text_data}
    res = _cli(*[a.format(**fill) for a in args])
    assert res.exit_code == code and message in res.output, res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_library_rejects_bad_input(tiny_llama_dir, tmp_path):
    with pytest.raises(momcompress.MomcompressError, match="unknown baseline method"):
        baseline("magnitude", tiny_llama_dir, tmp_path / "o")
    for target in (0.0, 1.0, -0.2):
        with pytest.raises(momcompress.MomcompressError, match="target must be in"):
            BaselineConfig(target=target)
    with pytest.raises(momcompress.MomcompressError, match="eval-tokens"):
        BaselineConfig(eval_tokens=10, seq_len=32)
    with pytest.raises(momcompress.MomcompressError, match="sets .*experts"):
        baseline("prune", tiny_llama_dir, tmp_path / "p", BaselineConfig(learn_options={"experts": 4}))
    (tmp_path / "exists").mkdir()
    with pytest.raises(momcompress.MomcompressError, match="--overwrite"):
        baseline("teal", tiny_llama_dir, tmp_path / "exists")
