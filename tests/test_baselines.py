"""`baseline`: MoEfication, static pruning, TEAL and WINA baselines on tiny models: each meets its target
ratio (measured with the loaded model's track_stats), the neuron permutation keeps the dense output, TEAL's
and WINA's thresholds read the asked fraction under every split, WINA's score uses the weight column norms,
folders load and generate, and bad input gets a clear error."""

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
from momcompress.baselines.teal import (
    KEEP_ALL, TealFFN, calibrate, final_hidden, global_grid, magnitude_threshold, mean_kl, read_fraction, score_scales, split_fh,
    teal_layers,
)
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


@pytest.mark.parametrize("score", ["teal", "wina"])
@pytest.mark.parametrize("split", ["global", "search", "equal", "fixed"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_thresholds_read_the_target_fraction_on_calibration_tokens(arch, split, score, tmp_path, text_data):
    model, tok = load_model(make_tiny_model_dir(tmp_path / arch, arch))
    calib, _ = calibration_and_heldout(tok, _config(text_data), 2048)
    info = calibrate(model, calib, 0.4, split, score=score, x_kept=0.5 if split == "fixed" else None)
    records = info["layers"]
    assert info["split"] == split and info["score"] == score
    assert len(teal_layers(model)) == len(records) == 2 and all(m.score == score for m in teal_layers(model))
    for r in records:
        assert read_fraction(r["x_kept"], r["h_kept"]) == pytest.approx(0.4, abs=1e-9)
        if split == "equal":
            assert r["x_kept"] == r["h_kept"] == 0.4
        if split == "fixed":
            assert r["x_kept"] == 0.5 and r["h_kept"] == pytest.approx(0.2)
    if split == "global":  # one split for every layer: the grid point with the least KL to the dense model
        sel = info["selection"]
        assert [g["x_kept"] for g in sel["grid"]] == global_grid(0.4)
        best = min(sel["grid"], key=lambda g: g["kl"])
        assert all(g["kl"] > 0 for g in sel["grid"]) and len({g["kl"] for g in sel["grid"]}) > 1
        assert all((r["x_kept"], r["h_kept"]) == (best["x_kept"], best["h_kept"]) == (sel["x_kept"], sel["h_kept"]) for r in records)
    else:
        assert "selection" not in info
    _, per_layer, _ = measure_ratio(model, calib, 8)
    assert per_layer == pytest.approx([0.4, 0.4], abs=2e-3)
    x = torch.randn(5, 64)  # with thresholds that keep everything, the layer is the dense FFN
    m = teal_layers(model)[0]
    m.x_threshold.fill_(KEEP_ALL)
    m.h_threshold.fill_(KEEP_ALL)
    with torch.no_grad():
        assert torch.allclose(m(x), m.dense_forward(x), atol=1e-6)


def test_global_grid_spans_the_feasible_splits():
    assert global_grid(0.5) == pytest.approx([0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7])
    assert global_grid(0.3) == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4])
    assert global_grid(0.7) == pytest.approx([0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
    assert 0.33 in global_grid(0.33)  # the equal split is always a candidate
    for t in (0.05, 0.3, 0.5, 0.7, 0.95):
        assert all(0.0 < split_fh(fx, t) < 1.0 and read_fraction(fx, split_fh(fx, t)) == pytest.approx(t) for fx in global_grid(t))


def _diag_ffn(score, gate_up, down):
    """A 4-wide TealFFN whose gate/up are diag(gate_up) and down diag(down): x_j feeds neuron j only."""
    m = TealFFN(4, 4, "silu", score=score)
    with torch.no_grad():
        m.gate_proj.weight.copy_(torch.diag(torch.tensor(gate_up)))
        m.up_proj.weight.copy_(torch.diag(torch.tensor(gate_up)))
        m.down_proj.weight.copy_(torch.diag(torch.tensor(down)))
    m.refresh_scales()
    return m


def test_wina_keeps_the_entries_whose_weight_columns_matter():
    """One token; keep one of four entries. TEAL keeps the largest |x_j|, WINA the largest |x_j| x column norm."""
    x = torch.tensor([[2.0, 1.0, 0.5, 0.25]])
    with torch.no_grad():
        # gate/up input: column norms sqrt(2) x [0.1, 10, 1, 1] -> WINA scores [0.28, 14.1, 0.71, 0.35]: channel 1
        for score, kept in (("teal", 0), ("wina", 1)):
            m = _diag_ffn(score, [0.1, 10.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])
            m._calibrate = ("fixed", 0.25, 1.0)
            m.track_stats = True
            y = m(x)
            only = torch.zeros_like(x)
            only[0, kept] = x[0, kept]
            assert torch.allclose(y, m.dense_forward(only)) and float(m.last_ratio) == pytest.approx((2 * 0.25 + 1) / 3)
        # down input: h = silu(x) * x = [3.52, 0.73, 0.16, 0.03]; down column norms [0.1, 10, 1, 1] -> WINA keeps neuron 1
        for score, kept in (("teal", 0), ("wina", 1)):
            m = _diag_ffn(score, [1.0, 1.0, 1.0, 1.0], [0.1, 10.0, 1.0, 1.0])
            m._calibrate = ("fixed", 1.0, 0.25)
            y = m(x)
            h = torch.nn.functional.silu(x) * x
            assert torch.allclose(y, m.down_proj(h * (torch.arange(4) == kept)))


def test_search_error_weighs_every_token_once():
    """split="search"'s per-layer error: mean over tokens of ||y_t - ref_t||^2 / ||ref_t||^2, so a token with a
    massive output (a window's first token) counts as much as any other, not by its norm."""
    torch.manual_seed(0)
    m = TealFFN(8, 16, "silu")
    x = torch.randn(6, 8)
    x[0] *= 50  # one token with a huge FFN output
    with torch.no_grad():
        ref = m.dense_forward(x)
        tx, th = m._thresholds(x, 0.5, 0.5)
        y, _, _ = m._sparse_forward(x, tx, th)
        want = [float((y[t] - ref[t]).pow(2).sum() / ref[t].pow(2).sum()) for t in range(6)]
        assert m._error(x, ref, tx, th) == pytest.approx(sum(want) / 6, rel=1e-5)
        pooled = float((y - ref).pow(2).sum() / ref.pow(2).sum())
    # the huge token keeps its large entries (error ~0) and the pooled error hides every other token's error
    assert want[0] < 1e-4 and min(want[1:]) > 0.1 and pooled < 1e-4


def test_score_scales_are_the_fused_column_norms():
    g = torch.Generator().manual_seed(0)
    w_gate, w_up, w_down = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g), torch.randn(5, 12, generator=g)
    xs, hs = score_scales(w_gate, w_up, w_down, "wina")
    assert torch.allclose(xs, torch.cat([w_gate, w_up]).norm(dim=0)) and xs.shape == (5,)
    assert torch.allclose(hs, torch.stack([w_down[:, i].norm() for i in range(12)])) and hs.shape == (12,)
    ones = score_scales(w_gate, w_up, w_down, "teal")
    assert torch.equal(ones[0], torch.ones(5)) and torch.equal(ones[1], torch.ones(12))
    with pytest.raises(ValueError, match="score must be one of"):
        score_scales(w_gate, w_up, w_down, "cats")


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: final logit soft-capping
def test_mean_kl_matches_the_models_own_logits(arch, tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / arch, arch)
    dense, _ = load_model(model_dir)
    other, _ = load_model(model_dir)  # the same head, another FFN: as a sparsified model
    with torch.no_grad():
        decoder_layers(other)[0].mlp.down_proj.weight.mul_(-3.0)
    ids = torch.randint(3, 200, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = torch.log_softmax(dense(ids).logits.float(), -1).reshape(-1, 256)
        q = torch.log_softmax(other(ids).logits.float(), -1).reshape(-1, 256)
        want = float((p.exp() * (p - q)).sum(-1).mean())
        got = mean_kl(dense, final_hidden(dense, ids), final_hidden(other, ids), chunk=7)
        assert mean_kl(dense, final_hidden(dense, ids), final_hidden(dense, ids)) == pytest.approx(0.0, abs=1e-6)
    assert want > 1e-3 and got == pytest.approx(want, rel=1e-4)


def test_calibrate_rejects_bad_splits(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir)
    seqs = torch.randint(3, 200, (2, 16))
    with pytest.raises(momcompress.MomcompressError, match="--split must be one of"):
        calibrate(model, seqs, 0.5, "layerwise")
    with pytest.raises(momcompress.MomcompressError, match="--x-kept goes with --split fixed"):
        calibrate(model, seqs, 0.5, "fixed")
    with pytest.raises(momcompress.MomcompressError, match=r"fx must be in \[0.25, 0.75\]"):
        calibrate(model, seqs, 0.5, "fixed", x_kept=0.9)
    with pytest.raises(momcompress.MomcompressError, match="score must be one of"):
        calibrate(model, seqs, 0.5, "equal", score="cats")
    assert not teal_layers(model)  # nothing was replaced


# -- end to end -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The four baselines of one tiny llama, built once: {method: (folder, manifest)}."""
    from conftest import write_text_data

    root = tmp_path_factory.mktemp("baselines")
    model_dir = make_tiny_model_dir(root / "model", "llama")
    data = write_text_data(root / "calib.txt")
    out = {"model": model_dir, "data": data}
    for method in ("moefication", "teal", "wina"):
        out[method] = (root / method, baseline(method, model_dir, root / method, _config(data)))
    cfg = _config(data, tokens=None, steps=3, learn_options={"batch_size": 2, "init_tokens": 256, "log_every": 100})
    out["prune"] = (root / "prune", baseline("prune", model_dir, root / "prune", cfg))
    return out


@pytest.mark.parametrize("method", ["moefication", "prune", "teal", "wina"])
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


@pytest.mark.parametrize("method", ["teal", "wina"])
def test_threshold_folder_keeps_dense_weights_and_reloads_exactly(built, method):
    folder, manifest = built[method]
    dense_keys = set(load_file(built["model"] / "model.safetensors"))
    assert set(load_file(folder / "model.safetensors")) == dense_keys - {"lm_head.weight"}  # tied embedding stored once
    section = json.loads((folder / "config.json").read_text())["momcompress"]
    assert section["split"] == "global" and manifest["details"]["split_selection"]["grid"]  # the default split
    model = momcompress.load(folder)
    layers = teal_layers(model)
    assert len(layers) == len(section["layers"]) == 2
    for m, record in zip(layers, section["layers"]):
        assert isinstance(m, TealFFN) and m.score == method
        assert float(m.x_threshold) == pytest.approx(record["x_threshold"]) and float(m.h_threshold) == pytest.approx(record["h_threshold"])
        want = score_scales(m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight, method)  # recomputed at load
        assert torch.equal(m.x_scale, want[0]) and torch.equal(m.h_scale, want[1])
        assert (method == "teal") == bool((m.x_scale == 1).all())
    assert not any(isinstance(m, FrozenMoMFFN) for m in model.modules())


def test_teal_and_wina_keep_different_entries_at_the_same_read(built):
    """The same tiny model at the same target: WINA's column-norm scores keep other entries than TEAL's."""
    teal_model, wina_model = momcompress.load(built["teal"][0]), momcompress.load(built["wina"][0])
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    t, w = teal_layers(teal_model)[0], teal_layers(wina_model)[0]
    keep_t, keep_w = x.abs() > t.x_threshold / t.x_scale, x.abs() > w.x_threshold / w.x_scale
    assert not torch.equal(keep_t, keep_w)
    # WINA's mask is the top of |x_j| s_j: every kept entry outscores every dropped one (per-entry cut = threshold / scale)
    s = x.abs() * w.x_scale
    assert float(s[keep_w].min()) >= float(w.x_threshold) >= float(s[~keep_w].max())


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


def test_cli_builds_wina_with_a_fixed_split(tiny_llama_dir, text_data, tmp_path):
    out = tmp_path / "wina"
    res = _cli("wina", tiny_llama_dir, "-o", out, "--data", text_data, "--tokens", 1024, "--eval-tokens", 256, "--seq-len", 32,
               "--target", 0.4, "--split", "fixed", "--x-kept", 0.45)
    assert res.exit_code == 0, res.output
    assert "wina: target 0.400" in res.output
    section = json.loads((out / "config.json").read_text())["momcompress"]
    assert section["method"] == "wina" and section["split"] == "fixed"
    assert all(r["x_kept"] == 0.45 and r["h_kept"] == pytest.approx(0.3) for r in section["layers"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["x_kept"] == 0.45 and "||W_down[:, i]||" in manifest["details"]["rule"]
    assert abs(manifest["fit_ratio"] - 0.4) <= 0.01


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["sparsegpt", "{model}", "-o", "{out}"], 2, "sparsegpt"),
        (["teal", "{model}", "-o", "{out}", "--target", "1.5"], 2, "--target"),
        (["teal", "{model}", "-o", "{out}", "--target", "0"], 2, "--target"),
        (["wina", "{model}", "-o", "{out}", "--split", "layerwise"], 2, "--split"),
        (["wina", "{model}", "-o", "{out}", "--split", "fixed", "--x-kept", "0"], 2, "--x-kept"),
        (["wina", "{model}", "-o", "{out}", "--split", "fixed"], 1, "--split fixed needs --x-kept"),
        (["teal", "{model}", "-o", "{out}", "--x-kept", "0.5"], 1, "--x-kept goes with --split fixed (got --split global)"),
        (["wina", "{model}", "-o", "{out}", "--split", "fixed", "--x-kept", "0.6", "--target", "0.3"], 1,
         "--x-kept 0.6 cannot meet target 0.3: with (2 fx + fh) / 3 = target and fh in [0, 1], the kept input fraction fx must be in [0, 0.45]"),
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
    with pytest.raises(momcompress.MomcompressError, match="--split fixed needs --x-kept"):
        BaselineConfig(split="fixed")
    with pytest.raises(momcompress.MomcompressError, match="--x-kept goes with --split fixed"):
        BaselineConfig(split="search", x_kept=0.5)
    with pytest.raises(momcompress.MomcompressError, match=r"fx must be in \[0.55, 1\]"):
        BaselineConfig(target=0.7, split="fixed", x_kept=0.5)
    assert BaselineConfig().split == "global"
    with pytest.raises(momcompress.MomcompressError, match="sets .*experts"):
        baseline("prune", tiny_llama_dir, tmp_path / "p", BaselineConfig(learn_options={"experts": 4}))
    (tmp_path / "exists").mkdir()
    with pytest.raises(momcompress.MomcompressError, match="--overwrite"):
        baseline("teal", tiny_llama_dir, tmp_path / "exists")
