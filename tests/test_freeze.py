"""`freeze` and the frozen runtime: classification, exactness against the learned model for every
architecture, measured ratio, folder contents, uniform experts, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.activations import ACT2FN

import momcompress
from conftest import TINY_ARCHS, make_tiny_model_dir
from momcompress.cli import main
from momcompress.config import LearnConfig
from momcompress.freeze.freezer import heldout_tokens, load_learned, measure_frozen_ratio, read_run, resolve_source
from momcompress.freeze.plan import pad_uniform, plan_layer, repack_layer
from momcompress.learn.mom import MoMFFN, gate_mode
from momcompress.learn.select import set_gate_offset
from momcompress.runtime.mom_ffn import frozen_layers, routed_experts_decode, routed_experts_grouped

REL_TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- classification (hand-built gate patterns) --------------------------------------------------------
def test_blocks_are_classified_shared_routed_pruned():
    z = torch.tensor(
        [  # E=3 experts x N=5 blocks
            [1.0, 0.0, 1.0, 0.5, 0.0],
            [1.0, 0.0, 1.0, 0.0, 0.0],
            [0.7, 0.0, 0.0, 1.0, 0.2],
        ]
    )
    plan = plan_layer(z)
    assert plan.shared.tolist() == [0]  # on in every expert (even at 0.7 in one)
    assert plan.pruned.tolist() == [1]  # on in none
    assert plan.routed.tolist() == [2, 3, 4]  # on in some
    # block 2 is used by experts 0 and 1: stored once (routed index 0), listed by both
    experts, scales = plan.expert_lists()
    assert experts == [[0, 1], [0], [1, 2]]
    assert [[round(s, 6) for s in e] for e in scales] == [[1.0, 0.5], [1.0], [1.0, 0.2]]
    assert plan.shared_scale.flatten().tolist() == pytest.approx([1.0, 1.0, 0.7])
    assert plan.counts() == {"shared": 1, "routed": 3, "pruned": 1}
    assert plan.to_json() == {"shared": 1, "routed": 3, "pruned": 1, "routed_stored": 3, "entries": 5}
    padded = pad_uniform(plan)
    assert padded.expert_sizes.tolist() == [2, 2, 2] and padded.padding.tolist() == [0, 1, 0]
    experts, scales = padded.expert_lists()
    assert experts[1] == [0, 3] and scales[1] == [1.0, 0.0]  # index 3 = the zero block
    assert experts[0] == [0, 1] and experts[2] == [1, 2]
    assert padded.to_json()["routed_stored"] == 4 and padded.to_json()["entries"] == 6


def test_vectorised_plan_matches_a_per_block_reference():
    """Random gates at b = 1 scale (many blocks, many experts): lists and scales equal a plain loop's."""
    torch.manual_seed(0)
    z = (torch.rand(16, 600) * 3 - 2).clamp(0, 1)  # ~1/3 of the gates on
    z[:, :5] = torch.rand(16, 5) + 0.1  # shared
    plan = plan_layer(z)
    on = z > 0
    routed = [j for j in range(600) if on[:, j].any() and not on[:, j].all()]
    assert plan.routed.tolist() == routed
    assert plan.shared.tolist() == [j for j in range(600) if on[:, j].all()]
    experts, scales = plan.expert_lists()
    for e in range(16):
        assert experts[e] == [i for i, j in enumerate(routed) if on[e, j]]
        assert scales[e] == pytest.approx([float(z[e, j]) for j in routed if on[e, j]])
    padded = pad_uniform(plan)
    width = max(len(x) for x in experts)
    pe, ps = padded.expert_lists()
    for e in range(16):
        assert pe[e] == experts[e] + [len(routed)] * (width - len(experts[e]))
        assert ps[e] == pytest.approx(scales[e] + [0.0] * (width - len(experts[e])))


def test_all_on_and_all_off_layers():
    assert plan_layer(torch.ones(4, 6)).counts() == {"shared": 6, "routed": 0, "pruned": 0}
    off = plan_layer(torch.zeros(4, 6))
    assert off.counts() == {"shared": 0, "routed": 0, "pruned": 6}
    assert pad_uniform(off).expert_sizes.tolist() == [0, 0, 0, 0]


# -- the frozen layer against the training layer ------------------------------------------------------
class _MLP(nn.Module):
    def __init__(self, d: int, f: int, act: str):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj, self.act_fn = nn.Linear(f, d, bias=False), ACT2FN[act]


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("act,name", [("silu", "silu"), ("gelu_pytorch_tanh", "gelu_tanh")])
def test_frozen_layer_equals_training_layer(top_k, uniform, act, name):
    torch.manual_seed(top_k)
    mom = MoMFFN(_MLP(32, 128, act), num_experts=4, top_k=top_k, block_size=8)
    nn.init.normal_(mom.router.weight)
    z = (torch.rand(4, 16) * 1.6 - 0.3).clamp(0, 1)  # fractional, on and off gates
    z[:, 0] = 1.0  # shared, scale 1
    z[:, 1] = torch.tensor([0.3, 1.0, 0.6, 0.9])  # shared with per-expert scales
    z[:, 2] = 0.0  # pruned
    mom.gate_override = z
    plan = plan_layer(z)
    if uniform:
        plan = pad_uniform(plan)
    frozen = repack_layer(mom.mlp, mom.router.weight, plan, top_k, 8, name)
    for T in (1, 3, 40, 80):  # decode path (T <= DECODE_MAX_TOKENS = 64) and grouped path
        x = torch.randn(2, T, 32)
        with torch.no_grad():
            assert _rel(frozen(x), mom(x)) <= REL_TOL
    # both routed paths compute the same thing; the work is the union of the selected blocks
    x = torch.randn(9, 32)
    top_w, top_i = frozen.route(x)
    args = (frozen.routed_gate, frozen.routed_up, frozen.routed_down, frozen.expert_block_scale, name)
    a, b = routed_experts_grouped(x, top_w, top_i, *args), routed_experts_decode(x, top_w, top_i, *args)
    assert _rel(a, b) <= REL_TOL
    expected_blocks = 2 + (z[top_i][..., 3:] > 0).any(dim=-2).sum(-1)  # 2 shared + union of routed
    assert torch.equal(frozen.blocks_read(top_i), expected_blocks.float())


def test_prompt_path_reads_the_union_when_grouping_would_reread_blocks():
    torch.manual_seed(0)
    E = 16
    mom = MoMFFN(_MLP(32, 256, "silu"), num_experts=E, top_k=1, block_size=8)  # 32 blocks
    nn.init.normal_(mom.router.weight, std=2.0)
    z = (torch.rand(E, 32) < 0.5).float()  # overlapping experts of ~16 blocks each
    mom.gate_override = z
    frozen = repack_layer(mom.mlp, mom.router.weight, plan_layer(z), 1, 8, "silu")
    frozen.decode_max_tokens = 0  # no decode shortcut: the cost rule alone picks the path
    few = frozen.route(torch.randn(24, 32))[1]  # ~1.5 tokens per expert: grouping rereads shared blocks
    assert frozen.union_is_cheaper(few)
    many = torch.zeros(4000, 1, dtype=torch.long)  # every token on one expert: grouping reads it once
    assert not frozen.union_is_cheaper(many)
    for T in (24, 4000):
        x = torch.randn(T, 32)
        with torch.no_grad():
            assert _rel(frozen(x), mom(x)) <= REL_TOL


def test_pruned_blocks_are_not_stored():
    mom = MoMFFN(_MLP(16, 64, "silu"), num_experts=3, top_k=1, block_size=8)
    z = torch.zeros(3, 8)
    z[0, :3] = 1
    z[1, 2:4] = 1
    z[2, 3] = 1
    frozen = repack_layer(mom.mlp, mom.router.weight, plan_layer(z), 1, 8, "silu")
    assert frozen.shared_gate.shape == (0, 16)
    assert frozen.routed_gate.shape == (4, 8, 16)  # blocks 0-3; block 2 (experts 0 and 1) once
    assert frozen.expert_blocks.tolist() == [0, 1, 2, 2, 3, 3]
    assert torch.equal(frozen.routed_gate[2], mom.mlp.gate_proj.weight[16:24])
    assert torch.equal(frozen.routed_down[2], mom.mlp.down_proj.weight[:, 16:24].T)


# -- end to end on tiny models of every architecture --------------------------------------------------
def _learn_cfg(data, **kw):
    # float32: the few gates of a tiny run land the same on every machine (auto would pick bf16 only
    # where the CPU has it), so the ratios freeze can reach below do not depend on the CI machine
    base = dict(target=0.5, selector="experts", experts=4, top_k=2, block_size=8, steps=6, batch_size=4, seq_len=32, data=str(data), eval_tokens=256,
                init_tokens=512, log_every=100, dtype="float32")
    base.update(kw)
    return LearnConfig(**base)


def _learned_run(workdir, data_file, arch: str, name: str = "", **kw):
    model_dir = make_tiny_model_dir(workdir / f"model-{arch}{name}", arch)
    run = workdir / f"run-{arch}{name}"
    momcompress.learn(str(model_dir), run, _learn_cfg(data_file, **kw))
    return model_dir, run


@pytest.fixture(scope="module")
def llama_frozen(workdir, data_file):
    model_dir, run = _learned_run(workdir, data_file, "llama", name="-tuned", tune_weights=True)
    frozen = workdir / "frozen-llama-tuned"
    manifest = momcompress.freeze(run, frozen)
    return model_dir, run, frozen, manifest


def _learned_model(run_dir, offset):
    run = read_run(run_dir)
    model, tok, _ = load_learned(run, resolve_source(run), torch.device("cpu"))
    set_gate_offset(model, offset)
    return model, tok


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_frozen_model_equals_learned_model(arch, workdir, data_file):
    """Logits (with padding) and greedy generation with the KV cache, for every architecture."""
    _, run = _learned_run(workdir, data_file, arch)
    frozen_dir = workdir / f"frozen-{arch}"
    # 2 layers x 16 blocks: one gate flip can move the ratio by ~0.04, so the tolerance is loose here
    # (test_measured_ratio_equals_manifest_and_sizes checks the default ±0.01).
    manifest = momcompress.freeze(run, frozen_dir, tolerance=0.05)
    learned, tok = _learned_model(run, manifest["threshold"]["gate_offset"])
    frozen = momcompress.load(frozen_dir)
    assert len(frozen_layers(frozen)) == manifest["num_layers"]
    tok.padding_side = "left"
    batch = tok(["The river ran cold under the old stone bridge", "She opened the door"], return_tensors="pt", padding=True)
    with torch.no_grad(), gate_mode(learned, "deterministic"):
        want = learned(**batch).logits
        got = frozen(**batch).logits
        mask = batch["attention_mask"].bool()
        assert _rel(got[mask], want[mask]) <= REL_TOL
        gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert torch.equal(frozen.generate(**batch, **gen), learned.generate(**batch, **gen))


def test_measured_ratio_equals_manifest_and_sizes(llama_frozen):
    model_dir, run, frozen_dir, manifest = llama_frozen
    model = momcompress.load(frozen_dir)
    r = read_run(run)
    seqs = heldout_tokens(r, _learned_model(run, 0.0)[1], None, None)
    ratio, per_layer, _ = measure_frozen_ratio(model, seqs, 8)
    assert ratio == pytest.approx(manifest["measured_ratio"], abs=1e-6)
    # the rule: the fit on calibration tokens meets the target within ±0.01; the held-out ratio (2 layers x 16
    # blocks, 256 tokens) may drift by a gate flip, and then the manifest says so
    assert abs(manifest["fit_ratio"] - 0.5) <= 0.01
    assert abs(ratio - 0.5) <= 0.01 or "held-out ratio" in (manifest.get("ratio_note") or "")
    assert per_layer == pytest.approx(manifest["measured_ratio_per_layer"], abs=1e-6)
    p = manifest["parameters"]
    # stored parameters, by hand: pruned blocks (3 x b x d each) leave, the routers (E x d per layer) come in
    section = json.loads((frozen_dir / "config.json").read_text())["momcompress"]
    b, d, E = section["block_size"], 64, section["num_experts"]
    pruned = sum(layer["pruned"] for layer in section["layers"])  # per-layer counts (lists live in the safetensors)
    assert p["dense_total"] - p["frozen_total"] == 3 * b * d * pruned - len(section["layers"]) * E * d
    assert p["ffn_active_per_token"] < p["dense_ffn_active_per_token"]
    assert p["model_active_per_token"] < p["dense_model_active_per_token"]
    assert manifest["perplexity"]["frozen"] > 0 and manifest["checks"]["logits_max_rel_diff"] <= REL_TOL


def test_frozen_folder_is_self_contained(llama_frozen, tmp_path):
    model_dir, run, frozen_dir, manifest = llama_frozen
    config = json.loads((frozen_dir / "config.json").read_text())
    section = config["momcompress"]
    assert section["num_experts"] == 4 and section["top_k"] == 2 and section["block_size"] == 8
    assert section["format_version"] == 2 and len(section["layers"]) == 2
    assert section["fit_ratio"] == manifest["fit_ratio"] and section["measured_ratio"] == manifest["measured_ratio"]
    tensors = load_file(frozen_dir / "model.safetensors")
    ids = load_file(frozen_dir / "blocks.safetensors")
    assert not any(k.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")) for k in tensors)
    N = section["num_blocks"]
    for i, layer in enumerate(section["layers"]):
        # config.json carries counts only; the lists are tensors
        assert set(layer) == {"shared", "routed", "pruned", "routed_stored", "entries"}
        mlp = f"model.layers.{i}.mlp."
        assert tensors[mlp + "routed_gate"].shape[0] == layer["routed"] == layer["routed_stored"]
        assert tensors[mlp + "shared_gate"].shape[0] == 8 * layer["shared"]
        assert tensors[mlp + "expert_blocks"].shape == (layer["entries"],) and tensors[mlp + "expert_offsets"][-1] == layer["entries"]
        # the original block ids partition the layer's blocks
        parts = [ids[f"layers.{i}.{kind}"] for kind in ("shared", "routed", "pruned")]
        assert [len(x) for x in parts] == [layer["shared"], layer["routed"], layer["pruned"]]
        assert sorted(torch.cat(parts).tolist()) == list(range(N))
        # the stored routed blocks are the source FFN's rows of those ids (the run tuned weights: compare
        # with the learned model's FFN, permuted as learn ordered the neurons)
    learned, _ = _learned_model(run, manifest["threshold"]["gate_offset"])
    mlp0 = learned.model.layers[0].mlp.mlp
    rows = (ids["layers.0.routed"].unsqueeze(1) * 8 + torch.arange(8)).flatten()
    assert torch.equal(tensors["model.layers.0.mlp.routed_gate"].reshape(-1, mlp0.gate_proj.weight.shape[1]), mlp0.gate_proj.weight[rows])
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_momcompress.MoMLlamaForCausalLM"
    assert (frozen_dir / "modeling_momcompress.py").is_file()
    # loads with no run folder, no source model and no training state
    moved = tmp_path / "moved"
    shutil.copytree(frozen_dir, moved)
    shutil.move(str(model_dir), str(tmp_path / "gone"))
    try:
        model = momcompress.load(moved)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(moved)
        out = model.generate(**tok(["The train"], return_tensors="pt"), max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert out.shape == (1, len(tok("The train")["input_ids"]) + 4)
    finally:
        shutil.move(str(tmp_path / "gone"), str(model_dir))


def test_uniform_experts_pad_to_equal_width(llama_frozen, workdir):
    _, run, frozen_dir, _ = llama_frozen
    out = workdir / "frozen-uniform"
    manifest = momcompress.freeze(run, out, uniform_experts=True)
    model = momcompress.load(out)
    for m in frozen_layers(model):
        sizes = m.expert_offsets.diff()
        assert (sizes == sizes[0]).all()
    # every expert padded to its layer's widest expert of the unpadded freeze (same run and target)
    real = [m.expert_offsets.diff().tolist() for m in frozen_layers(momcompress.load(frozen_dir))]  # unpadded widths
    assert [m.expert_offsets.diff().tolist() for m in frozen_layers(model)] == [[max(s)] * len(s) for s in real]
    assert manifest["padding_overhead"] == pytest.approx(sum(len(s) * max(s) - sum(s) for s in real) / sum(map(sum, real)))
    learned, tok = _learned_model(run, manifest["threshold"]["gate_offset"])
    ids = tok(["He counted the coins twice"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert _rel(model(ids).logits, learned(ids).logits) <= REL_TOL


# -- bad input ------------------------------------------------------------------------------------
def _cli(*args):
    return CliRunner().invoke(main, ["freeze", *map(str, args)])


def test_cli_prints_split_and_writes_folder(llama_frozen, tmp_path):
    _, run, _, _ = llama_frozen
    res = _cli(run, "-o", tmp_path / "f")
    assert res.exit_code == 0, res.output
    assert "shared" in res.output and "total" in res.output and "measured ratio" in res.output
    assert "threshold" in res.output and (tmp_path / "f" / "manifest.json").is_file()
    res = _cli(run, "-o", tmp_path / "f")
    assert res.exit_code == 1 and "exists" in res.output and "--overwrite" in res.output
    res = _cli(run, "-o", tmp_path / "g", "--table-dtype", "bfloat16")  # the selector's option, not expert masks'
    assert res.exit_code == 1 and "--table-dtype applies to per-token selector runs" in res.output
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("damage", ["no_masks", "corrupt_masks", "corrupt_manifest", "no_weights", "bad_perm"])
def test_cli_rejects_broken_run_folders(damage, llama_frozen, tmp_path):
    _, run, _, _ = llama_frozen
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    if damage == "no_masks":
        (broken / "masks.safetensors").unlink()
    elif damage == "corrupt_masks":
        (broken / "masks.safetensors").write_bytes(b"not a safetensors file")
    elif damage == "corrupt_manifest":
        (broken / "manifest.json").write_text("{ truncated")
    elif damage == "bad_perm":
        masks = load_file(broken / "masks.safetensors")
        masks["neuron_perm"][0, 0] = masks["neuron_perm"][0, 1]  # a neuron twice, one lost
        save_file(masks, broken / "masks.safetensors")
    else:
        (broken / "weights.safetensors").unlink()
    res = _cli(broken, "-o", tmp_path / "out")
    assert res.exit_code == 1
    assert {"no_masks": "masks.safetensors", "corrupt_masks": "corrupt", "corrupt_manifest": "manifest.json", "no_weights": "weights.safetensors", "bad_perm": "neuron_perm"}[damage] in res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_cli_rejects_gone_or_changed_source_model(workdir, data_file, tmp_path):
    model_dir, run = _learned_run(workdir, data_file, "qwen2", name="-moved")  # its own model: this test changes it
    hidden = tmp_path / "hidden"
    shutil.move(str(model_dir), str(hidden))
    res = _cli(run, "-o", tmp_path / "out")
    assert res.exit_code == 1 and "gone" in res.output and "--model" in res.output
    # pointed at it: fine (a 6-step tiny run's gates move the ratio in coarse steps: a wider tolerance)
    res = _cli(run, "-o", tmp_path / "out", "--model", hidden, "--tolerance", "0.05")
    assert res.exit_code == 0, res.output
    config = json.loads((hidden / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (hidden / "config.json").write_text(json.dumps(config))
    res = _cli(run, "-o", tmp_path / "out2", "--model", hidden)
    assert res.exit_code == 1 and "sha256" in res.output
    assert not (tmp_path / "out2").exists()


def test_cli_says_when_the_target_cannot_be_met(workdir, data_file, tmp_path):
    # One expert, two blocks per layer, two layers: only ratios in steps of 1/4 exist.
    model_dir = make_tiny_model_dir(workdir / "model-coarse", "llama")
    run = workdir / "run-coarse"
    momcompress.learn(str(model_dir), run, _learn_cfg(data_file, experts=1, top_k=1, block_size=64, steps=3))
    res = _cli(run, "-o", tmp_path / "out", "--target", "0.4")
    assert res.exit_code == 1 and "cannot meet target 0.400" in res.output and "nearest achievable" in res.output
    assert not (tmp_path / "out").exists()


def test_load_rejects_a_dense_folder(tiny_llama_dir):
    with pytest.raises(momcompress.MomcompressError, match="not a frozen MoM model"):
        momcompress.load(tiny_llama_dir)


# -- dtypes --------------------------------------------------------------------------------------------
def test_bf16_run_freezes_within_the_bf16_tolerance(workdir, data_file, tmp_path):
    """A bf16 (mixed-precision) learn run at b = 1 freezes: its tuned weights are fp32 masters, so the frozen
    model is fp32 and meets the fp32 check; the folder loads and generates."""
    model_dir = make_tiny_model_dir(workdir / "model-bf16", "llama")
    run = workdir / "run-bf16"
    momcompress.learn(str(model_dir), run, _learn_cfg(data_file, block_size=1, steps=4, dtype="bfloat16", tune_weights=True))
    res = _cli(run, "-o", tmp_path / "f", "--tolerance", "0.05")
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["checks"]["logits_rtol"] == pytest.approx(1e-4)
    assert manifest["checks"]["logits_max_rel_diff"] <= 1e-4
    model = momcompress.load(tmp_path / "f")
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 6)


def test_a_failed_self_check_is_a_clean_error(llama_frozen, tmp_path, monkeypatch):
    """Frozen logits that drift from the learned ones: exit 1 with a message (no traceback), nothing written."""
    from momcompress.freeze import freezer

    real = freezer.repack_layer

    def damaged(*args, **kwargs):
        module = real(*args, **kwargs)
        with torch.no_grad():
            module.shared_down.mul_(50.0)
            module.routed_down.mul_(50.0)
        return module

    monkeypatch.setattr(freezer, "repack_layer", damaged)
    _, run, _, _ = llama_frozen
    res = _cli(run, "-o", tmp_path / "out")
    assert res.exit_code == 1 and "differ from the learned model's" in res.output and "allowed for float32" in res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    assert not (tmp_path / "out").exists()


def test_format_1_folders_still_load(llama_frozen, tmp_path):
    """A folder of the older format (block lists in config.json, no modeling file) loads as before."""
    _, _, frozen_dir, _ = llama_frozen
    old = tmp_path / "v1"
    shutil.copytree(frozen_dir, old)
    config = json.loads((old / "config.json").read_text())
    tensors, ids = load_file(old / "model.safetensors"), load_file(old / "blocks.safetensors")
    layers = []
    for i in range(len(config["momcompress"]["layers"])):
        mlp = f"model.layers.{i}.mlp."
        cuts = tensors[mlp + "expert_offsets"][1:-1]
        experts = [t.tolist() for t in tensors[mlp + "expert_blocks"].tensor_split(cuts)]
        layers.append({**{k: ids[f"layers.{i}.{k}"].tolist() for k in ("shared", "routed", "pruned")}, "experts": experts, "padding": [0] * len(experts)})
    config["momcompress"].update(format_version=1, layers=layers)
    del config["auto_map"]
    (old / "config.json").write_text(json.dumps(config))
    (old / "blocks.safetensors").unlink()
    (old / "modeling_momcompress.py").unlink()
    ids = torch.tensor([[5, 9, 17, 33, 60, 2]])
    with torch.no_grad():
        assert torch.equal(momcompress.load(old)(ids).logits, momcompress.load(frozen_dir)(ids).logits)
    config["momcompress"]["format_version"] = 7
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(momcompress.MomcompressError, match="upgrade momcompress"):
        momcompress.load(old)
