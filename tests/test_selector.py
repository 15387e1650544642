"""The per-token selector (learn --selector activations): the training layer's math, the threshold
projection and steps, learn end to end (target, resume, learning helps), freeze (exact on the fit
tokens, shared / pruned classification), loading (momcompress.load, plain transformers), the fused CPU
kernel against the reference, export, validate's cost, and the errors on bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model_dir, tiny_tokenizer

import momcompress
from momcompress.config import LearnConfig
from momcompress.errors import ConfigError, RunDirError
from momcompress.learn import trainer
from momcompress.learn.selector import (
    SelectFFN,
    initial_split,
    read_fraction,
    select_layers,
    selector_read,
    shift_thresholds,
    solve_select_offset,
    threshold_step,
    wrap_with_select,
)
from momcompress.runtime.select_ffn import FrozenSelectFFN, select_ffn_reference


def _cfg(data, **kw):
    base = dict(target=0.5, selector="activations", steps=8, batch_size=4, seq_len=32, data=str(data), eval_tokens=256, init_tokens=512,
                checkpoint_every=4, log_every=100, dtype="float32")
    base.update(kw)
    return LearnConfig(**base)


def _set(layer, theta_x, theta_h):
    with torch.no_grad():
        layer.theta_x.fill_(theta_x)
        layer.theta_h.fill_(theta_h)


def _mlp(d=16, f=32, seed=0):
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(seed)
    return LlamaMLP(AutoConfig.for_model("llama", hidden_size=d, intermediate_size=f, num_attention_heads=2, num_key_value_heads=2)).float()


# -- the training layer ---------------------------------------------------------------------------------
def test_select_ffn_reads_the_channels_and_neurons_its_wina_scores_keep():
    mlp = _mlp()
    layer = SelectFFN(mlp)
    _set(layer, math.log(0.5), math.log(0.02))
    x = torch.randn(5, 16)
    c = (mlp.gate_proj.weight.pow(2).sum(0) + mlp.up_proj.weight.pow(2).sum(0)).sqrt()  # (d,) column norms
    n = mlp.down_proj.weight.norm(dim=0)  # (F,)
    keep_x = x.abs() * c > 0.5
    xs = x * keep_x
    h = F.silu(xs @ mlp.gate_proj.weight.T) * (xs @ mlp.up_proj.weight.T)
    keep_h = h.abs() * n > 0.02
    want = (h * keep_h) @ mlp.down_proj.weight.T
    layer.track_stats = True
    got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert 0 < keep_x.float().mean() < 1 and 0 < keep_h.float().mean() < 1  # the case is not trivial
    ratio = read_fraction(keep_x.sum(-1).float(), keep_h.sum(-1).float(), 16, 32).mean()
    assert float(layer.last_stats.ratio) == pytest.approx(float(ratio))
    # with thresholds below every score the layer is the dense FFN
    _set(layer, -100.0, -100.0)
    torch.testing.assert_close(layer(x), mlp(x), rtol=1e-5, atol=1e-6)


def test_threshold_gradient_flows_straight_through_and_points_to_reading_more():
    """The loss gets its value from the hard masks; the thresholds get a gradient (through the sigmoid)
    whose sign says that lowering them (reading more) lowers the error to the dense output."""
    mlp = _mlp()
    layer = SelectFFN(mlp)
    layer.gate_mode = "sample"
    _set(layer, math.log(0.5), math.log(0.02))
    x = torch.randn(64, 16)
    loss = (layer(x) - mlp(x)).pow(2).sum()
    loss.backward()
    assert layer.theta_x.grad > 0 and layer.theta_h.grad > 0
    with torch.no_grad():
        layer.gate_mode = "deterministic"
        hard = (layer(x) - mlp(x)).pow(2).sum()
    assert float(loss.detach()) == pytest.approx(float(hard), rel=1e-6)


def test_projection_offset_meets_the_target_on_the_sampled_scores():
    layers = [SelectFFN(_mlp(seed=s)) for s in range(3)]
    g = torch.Generator().manual_seed(0)
    scores = [(torch.randn(400, generator=g), torch.randn(800, generator=g) - 1) for _ in layers]
    for m in layers:
        _set(m, 0.3, -0.5)
    off = solve_select_offset(layers, scores, 0.4)
    got = sum(((lx > 0.3 + off).float().mean() * 2 + (lh > -0.5 + off).float().mean()) / 3 for lx, lh in scores) / 3
    assert float(got) == pytest.approx(0.4, abs=0.003)
    shift_thresholds(layers, off)
    assert float(layers[1].theta_x.detach()) == pytest.approx(0.3 + off)


def test_threshold_step_moves_budget_toward_the_layer_with_the_larger_gradient():
    layers = [SelectFFN(_mlp(seed=s)) for s in range(2)]
    for m, g in zip(layers, (1.0, 4.0)):
        m.theta_x.grad = torch.tensor(g)
        m.theta_h.grad = torch.tensor(g)
    threshold_step(layers, 0.1)
    # normalised over all thresholds: the mean |grad| (2.5) moves by lr; layer 1 four times as far as layer 0
    assert float(layers[0].theta_x.detach()) == pytest.approx(-0.1 * 1 / 2.5)
    assert float(layers[1].theta_x.detach()) == pytest.approx(-0.1 * 4 / 2.5)


def test_initial_split_reads_the_target():
    for t in (0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.97):
        fx, fh = initial_split(t)
        assert (2 * fx + fh) / 3 == pytest.approx(t) and 0 < fh <= fx + 1e-12 and fx <= 1, (t, fx, fh)


# -- learn end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(workdir, data_file):
    model_dir = make_tiny_model_dir(workdir / "model")
    out = workdir / "run"
    manifest = momcompress.learn(str(model_dir), out, _cfg(data_file))
    return model_dir, out, manifest


def test_learn_reaches_the_target_and_writes_a_complete_run(run):
    model_dir, out, manifest = run
    for name in ("masks.safetensors", "weights.safetensors", "trainer_state.pt", "manifest.json", "log.jsonl"):
        assert (out / name).is_file(), name
    assert manifest["selector"] == "activations" and manifest["config"]["selector"] == "activations"
    metrics = manifest["metrics"]
    assert abs(metrics["fit_ratio"] - 0.5) <= 0.01  # the ratio rule: fitted on calibration windows
    assert abs(metrics["target_matched_ratio"] - 0.5) <= 0.05  # measured on held-out windows
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(steps) == 8 and all(abs(s["ratio"] - 0.5) < 0.03 for s in steps)  # projected on target every step
    assert math.isfinite(metrics["perplexity_target_matched"]) and metrics["perplexity_dense"] > 0


def test_resume_gives_the_same_thresholds_and_weights(run, data_file, tmp_path):
    from safetensors.torch import load_file

    model_dir, out, _ = run
    part = tmp_path / "resumed"
    stop = {"n": 0}

    def interrupt(metrics):
        stop["n"] += 1
        if stop["n"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        momcompress.learn(str(model_dir), part, _cfg(data_file), on_step=interrupt)
    momcompress.learn(str(model_dir), part, _cfg(data_file), resume=True)
    a, b = load_file(out / "masks.safetensors"), load_file(part / "masks.safetensors")
    torch.testing.assert_close(a["thresholds"], b["thresholds"], rtol=0, atol=1e-5)
    wa, wb = load_file(out / "weights.safetensors"), load_file(part / "weights.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)


def test_learning_the_selector_beats_its_untrained_init(data_file, workdir):
    """At the same measured read, the trained thresholds and weights distil better on held-out tokens
    than the untrained selector (WINA scores, initial thresholds) they start from."""
    from momcompress.calibration.data import batch_for_step, build_token_batches
    from momcompress.learn.mom import gate_mode
    from momcompress.learn.selector import init_thresholds, match_select_target, set_offset
    from momcompress.models import load_model

    torch.manual_seed(0)
    model_dir = make_tiny_model_dir(workdir / "model_learns", seed=1, initializer_range=0.2)  # FFNs that matter
    cfg = _cfg(data_file, steps=60, weight_lr=3e-3)
    data = build_token_batches(tiny_tokenizer(), str(data_file), 32, 60 * 4 * 32, 8 * 32, 0)
    model, _ = load_model(model_dir)
    learner = trainer.Learner(model, cfg, block_size=1, device=torch.device("cpu"))
    init_thresholds(model, learner.layers, data.train[:16], 0.5)

    def heldout_kd():
        held = data.heldout
        off, ratio = match_select_target(model, data.train[:8], 0.5, 8, tol=0.01)
        with torch.no_grad():
            with gate_mode(model, "dense"):
                t = torch.log_softmax(model(input_ids=held).logits, -1)
            with gate_mode(model, "deterministic"):
                s = torch.log_softmax(model(input_ids=held).logits, -1)
        set_offset(model, 0.0)
        return float((t.exp() * (t - s)).sum(-1).mean()), ratio

    kd_init, r_init = heldout_kd()
    for step in range(cfg.steps):
        learner.train_step(batch_for_step(data.train, step, 4, 0), 0)
    kd_learned, r_learned = heldout_kd()
    assert abs(r_init - 0.5) <= 0.01 and abs(r_learned - 0.5) <= 0.01
    assert kd_learned < 0.8 * kd_init, (kd_learned, kd_init)


# -- freeze, load, export -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frozen(run, workdir):
    model_dir, out, _ = run
    fdir = workdir / "frozen"
    manifest = momcompress.freeze(out, fdir, table_dtype="model")  # fp32 tables: the reference for the bf16 ones
    return model_dir, fdir, manifest


def test_freeze_matches_the_learned_model_and_meets_the_target(frozen):
    _, fdir, manifest = frozen
    assert manifest["checks"]["logits_max_rel_diff"] <= 1e-4
    assert abs(manifest["fit_ratio"] - 0.5) <= 0.01
    counts = manifest["neurons"]["total"]
    assert counts["shared"] + counts["per_token"] + counts["pruned"] == 2 * 128
    section = json.loads((fdir / "config.json").read_text())["momcompress"]
    assert section["selector"] == "activations" and len(section["layers"]) == 2
    p = manifest["parameters"]
    assert p["selector_per_token"] == sum(64 + layer["neurons"] for layer in section["layers"])


def test_frozen_folder_loads_with_momcompress_and_plain_transformers_alike(frozen):
    from transformers import AutoModelForCausalLM

    _, fdir, _ = frozen
    ours = momcompress.load(fdir)
    assert isinstance(ours.model.layers[0].mlp, FrozenSelectFFN)
    plain = AutoModelForCausalLM.from_pretrained(fdir, trust_remote_code=True)
    ids = torch.randint(3, 200, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def frozen_bf16(run, workdir):
    _, out, _ = run
    fdir = workdir / "frozen-bf16"
    return fdir, momcompress.freeze(out, fdir)  # the default, auto: bf16 tables in this fp32 model


def test_bf16_tables_halve_the_ffn_bytes_and_keep_the_model_fp32(frozen, frozen_bf16):
    """freeze's default (--table-dtype auto) in an fp32 model, bfloat16: gate_up and down stored as bf16 (the rest
    fp32), loaded as such; the row kernel
    and the masked path (fp32 copies of the tables) compute the same function, within bf16 rounding of the fp32-table
    model, and plain transformers (which widens the tables as it loads them) computes it too."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    _, f32_dir, f32_manifest = frozen
    fdir, manifest = frozen_bf16
    assert manifest["table_dtype"] == "bfloat16" and f32_manifest["table_dtype"] == "float32"
    assert manifest["checks"]["table_rounding_logits_rel_diff"] < 0.05
    assert manifest["checks"]["logits_max_rel_diff"] <= 1e-4  # the repack itself is still checked with fp32 tables
    with safe_open(str(fdir / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {v for k, v in dtypes.items() if k.endswith(("mlp.gate_up", "mlp.down"))} == {"BF16"}
    assert {v for k, v in dtypes.items() if k.endswith(("threshold", "embed_tokens.weight", "q_proj.weight"))} == {"F32"}
    assert abs(manifest["perplexity"]["frozen"] / f32_manifest["perplexity"]["frozen"] - 1) < 0.02

    ours, ref = momcompress.load(fdir), momcompress.load(f32_dir)
    layer = ours.model.layers[0].mlp
    assert layer.gate_up.dtype == layer.down.dtype == torch.bfloat16 and ours.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(3, 200, (1, 24))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = {}
        for path in ("masked", "native") if layer.row_kernel(torch.zeros(1, 64)) == "native" else ("masked",):
            for m in ours.model.layers:
                m.mlp.path = path
            got[path] = ours(input_ids=ids).logits
            assert got[path].dtype == torch.float32
            assert float((got[path] - want).abs().max() / want.abs().max()) < 0.05, path
        plain = AutoModelForCausalLM.from_pretrained(fdir, trust_remote_code=True)(input_ids=ids).logits
    torch.testing.assert_close(got["masked"], plain, rtol=1e-5, atol=1e-5)
    if "native" in got:
        torch.testing.assert_close(got["native"], got["masked"], rtol=1e-4, atol=1e-4)
    assert layer.gate_up.dtype == torch.bfloat16  # the masked path's fp32 copies sit beside the tables
    assert layer.tables_for(torch.zeros(1, 64))[0].dtype == torch.float32


def test_table_dtype_is_refused_where_it_does_not_apply(run, tmp_path):
    from momcompress.freeze.freezer import narrow_tables

    _, out, _ = run
    with pytest.raises(ConfigError, match="table dtype must be one of"):
        momcompress.freeze(out, tmp_path / "f", table_dtype="int8")
    layer = FrozenSelectFFN(8, 16, 16, "silu", dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="needs an fp32 model"):
        narrow_tables([layer], torch.float16, torch.bfloat16)
    assert narrow_tables([layer], torch.bfloat16, torch.bfloat16) is None and not (tmp_path / "f").exists()


def test_plan_classifies_shared_per_token_and_pruned_neurons():
    from momcompress.freeze.select_plan import ALWAYS, plan_select_layer, repack_select_layer

    mlp = _mlp(d=8, f=6)
    channel_counts = torch.tensor([10, 0, 3, 10, 5, 0, 1, 2])
    neuron_counts = torch.tensor([10, 0, 4, 10, 0, 1])
    plan = plan_select_layer(channel_counts, neuron_counts, 10, -1.0, -2.0)
    assert plan.neurons.tolist() == [0, 2, 3, 5] and plan.shared_neurons.tolist() == [0, 3] and plan.pruned_neurons.tolist() == [1, 4]
    assert plan.shared_channels.tolist() == [0, 3] and plan.pruned_channels.tolist() == [1, 5]
    frozen = repack_select_layer(mlp, torch.full((8,), 0.25), torch.full((6,), 0.5), plan, "silu")
    assert frozen.num_neurons == 4
    assert frozen.x_threshold.tolist()[:2] == [ALWAYS, float("inf")] and frozen.h_threshold.tolist() == [ALWAYS, 0.5, ALWAYS, 0.5]
    # the stored rows are the kept neurons' gate / up (interleaved) and down columns
    torch.testing.assert_close(frozen.gate_up[:, 2], mlp.gate_proj.weight[2])  # neuron 2 is stored second: gate at column 2
    torch.testing.assert_close(frozen.gate_up[:, 3], mlp.up_proj.weight[2])
    torch.testing.assert_close(frozen.down[3], mlp.down_proj.weight[:, 5])


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_fused_cpu_kernel_equals_the_reference(activation, tokens):
    from momcompress.kernels import cpu_select

    if not cpu_select.available():
        pytest.skip("Numba is not installed (pip install 'momcompress[cpu]')")
    g = torch.Generator().manual_seed(tokens)
    d, n = 40, 400  # n is not a multiple of the kernel's neuron chunk
    x = torch.randn(tokens, d, generator=g)
    gate_up = torch.randn(d, 2 * n, generator=g) / d**0.5
    down = torch.randn(n, d, generator=g) / n**0.5
    x_thr = torch.rand(d, generator=g)
    x_thr[0] = -1.0  # a shared channel
    h_thr = torch.rand(n, generator=g) * 0.3
    h_thr[:5] = -1.0
    want = select_ffn_reference(x, x_thr, gate_up, down, h_thr, activation)
    got = cpu_select.select_ffn_rows(x, x_thr, gate_up, down, h_thr, activation)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if tokens == 1:  # 16-bit tables are the compiled kernel's: a clear error, not numba's
        with pytest.raises(TypeError, match="fp32 tables"):
            cpu_select.select_ffn_rows(x, x_thr, gate_up.bfloat16(), down.bfloat16(), h_thr, activation)


def test_auto_path_falls_back_to_the_numba_kernel_without_the_compiled_one(monkeypatch):
    """MOMCOMPRESS_CPU_OPS=off (or no compiler): auto's row kernel is the Numba one, tried against masked in place
    like the compiled one (tests/test_cpu_native.py has the measuring itself)."""
    from momcompress.kernels import cpu_native, cpu_select
    from momcompress.runtime import select_ffn as runtime

    if not cpu_select.available():
        pytest.skip("Numba is not installed (pip install 'momcompress[cpu]')")
    monkeypatch.setenv(cpu_native.ENV_LIBRARY, "off")
    monkeypatch.delenv(runtime.ENV_MAX_TOKENS, raising=False)
    cpu_native.reset()
    try:
        layer = FrozenSelectFFN(16, 32, 32, "silu")
        torch.nn.init.normal_(layer.gate_up)
        torch.nn.init.normal_(layer.down)
        x = torch.randn(1, 16)
        assert layer.row_kernel(x) == "fused"
        tried = []
        real = layer.run_path
        monkeypatch.setattr(layer, "run_path", lambda path, x: tried.append(path) or real(path, x))
        with torch.no_grad():
            for _ in range(2 * (runtime.TRIALS + 1)):
                torch.testing.assert_close(layer(x), layer.masked(x), rtol=1e-4, atol=1e-5)
        assert sorted(set(tried)) == ["fused", "masked"]
        assert list(layer.decisions().values())[0] in ("fused", "masked")
    finally:
        cpu_native.reset()


def test_export_runs_in_onnxruntime_and_matches_pytorch(frozen, workdir):
    """export's own checks: one SelectFFN node per layer with its body, logits with and without past, and
    greedy tokens identical to PyTorch (a failed check raises)."""
    import onnx

    _, fdir, _ = frozen
    manifest = momcompress.export(fdir, workdir / "onnx", new_tokens=8)
    assert all(c["ok"] for c in manifest["checks"])
    model = onnx.load(str(workdir / "onnx" / "model.onnx"))
    from momcompress.export import select_op

    assert len(select_op.select_nodes(model)) == 2 and sum(n.op_type == "If" for n in model.graph.node) == 2
    assert not any(n.op_type == "SelectFFN" for n in model.graph.node)  # each inside its layer's If on the token count
    assert [f.name for f in model.functions] == ["SelectFFN", "SelectHidden"]
    names = [c["name"] for c in manifest["checks"]]
    assert any("with past" in n and "selector thresholds off" in n for n in names)
    assert any(n.startswith("greedy generation") and "selector thresholds off" in n for n in names)
    assert any(n.startswith("SelectFFN nodes alone") for n in names)
    assert any("SelectFFN: function body" in n for n in names) and not any("MoMExperts" in n for n in names)
    assert manifest["custom_domain"]["op_type"] == "SelectFFN"
    assert manifest["validation"]["experts_path"] == "function body"  # the tests' own cache holds no kernel library


def test_export_node_check_catches_wrong_thresholds(frozen, workdir):
    """The per-layer SelectFFN check compares the file's node with PyTorch's layer: a threshold that differs
    between them (not a tie) fails it and names the layer; thresholds off in a session change the logits."""
    import numpy as np

    from momcompress.export.causal_lm import OrtCausalLM
    from momcompress.export.checks import check_select_nodes, prompt_batch, threshold_overrides
    from momcompress.export.exporter import load_for_export
    from momcompress.runtime.select_ffn import select_layers

    _, fdir, _ = frozen
    path = workdir / "onnx-node-check" / "model.onnx"
    if not path.exists():
        momcompress.export(fdir, path.parent, new_tokens=4)
    model, tok, _ = load_for_export(fdir, False)
    layers = select_layers(model)
    for m in layers:
        m.path = "masked"
    assert check_select_nodes(path, model, tok, layers).ok
    layers[1].h_threshold.mul_(2.0)
    check = check_select_nodes(path, model, tok, layers)
    assert not check.ok and "layer 1" in check.detail and "no threshold tie" in check.detail

    ids, mask = prompt_batch(tok)
    pos = np.cumsum(mask, axis=1) - 1
    on, off = OrtCausalLM(path), OrtCausalLM(path, initializers=threshold_overrides(path))
    assert len(threshold_overrides(path)) == 2 * len(layers)
    a, _ = on.run(ids, mask, pos, on.first_past(2))
    b, _ = off.run(ids, mask, pos, off.first_past(2))
    assert np.abs(a - b).max() > 1e-3


# -- bad input ------------------------------------------------------------------------------------------
def test_bad_input_gets_a_clear_error(run, data_file, tmp_path):
    model_dir, out, _ = run
    with pytest.raises(ConfigError, match="--experts.*--selector experts"):
        LearnConfig(selector="activations", experts=8)
    with pytest.raises(ConfigError, match="--selector must be one of"):
        LearnConfig(selector="neurons")
    with pytest.raises(ConfigError, match="below what the selector itself reads"):
        momcompress.learn(str(model_dir), tmp_path / "tiny", _cfg(data_file, target=selector_read(64, 128) / 2))
    assert not (tmp_path / "tiny").exists() and not (tmp_path / "tiny.partial").exists()
    with pytest.raises(ConfigError, match="--uniform-experts"):
        momcompress.freeze(out, tmp_path / "f", uniform_experts=True)
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(out, bad)
    from safetensors.torch import save_file

    save_file({"thresholds": torch.zeros(3, 2)}, bad / "masks.safetensors")
    with pytest.raises(RunDirError, match="selector thresholds"):
        momcompress.freeze(bad, tmp_path / "f2")


def test_validate_counts_the_selector_reads(frozen, tmp_path):
    from conftest import write_text_data

    model_dir, fdir, _ = frozen
    held = write_text_data(tmp_path / "held.txt", repeats=30)
    held.write_text(held.read_text().replace("river", "stream"))
    report = momcompress.validate(fdir, dense=model_dir, output=tmp_path / "r", data=str(held), task_names="none",
                                  measure_speed=False, seq_len=32, heldout_tokens=256, progress=False)
    section = json.loads((fdir / "config.json").read_text())["momcompress"]
    sparse = report["cost"]["sparse"]
    assert sparse["router"] == sum(64 + layer["neurons"] for layer in section["layers"])
    measured = report["activation_ratio"]["measured"]
    assert sparse["ffn"] == pytest.approx(measured * 2 * 3 * 64 * 128, rel=1e-3)


def test_validate_reports_the_bytes_16_bit_tables_read(frozen, frozen_bf16, tmp_path):
    from conftest import write_text_data

    from momcompress.validate.report import format_summary

    model_dir = frozen[0]
    held = write_text_data(tmp_path / "held.txt", repeats=30)
    held.write_text(held.read_text().replace("river", "stream"))
    reports = [momcompress.validate(fdir, dense=model_dir, output=tmp_path / name, data=str(held), task_names="none",
                                    measure_speed=False, seq_len=32, heldout_tokens=256, progress=False)
               for name, fdir in (("f32", frozen[1]), ("bf16", frozen_bf16[0]))]
    f32, bf16 = (r["activation_ratio"] for r in reports)
    assert f32["bytes_ratio"] is None and "FFN bytes read" not in format_summary(reports[0])
    assert bf16["table_dtype"] == "bfloat16" and bf16["bytes_ratio"] == pytest.approx(bf16["measured"] / 2)
    assert "FFN bytes read per token (bfloat16 tables)" in format_summary(reports[1])


def test_freeze_layer_check_allows_threshold_ties_not_repacking_errors():
    """freeze compares each frozen selector layer with the learned one on the same inputs: a token or two
    whose score sat on a threshold may differ (hard masks flip with the summation order), a wrong
    repacking differs on most tokens and stops freeze."""
    from momcompress.errors import FreezeCheckError
    from momcompress.freeze.freezer import SELECT_FLIP_FRACTION, check_select_layers

    torch.manual_seed(0)
    d, n = 16, 32
    layer = FrozenSelectFFN(d, n, n, "silu")
    layer.gate_up.data.normal_(), layer.down.data.normal_()
    layer.x_threshold.fill_(0.3), layer.h_threshold.fill_(0.5)
    x = torch.randn(1, 400, d)
    with torch.no_grad():
        y = layer(x)
    assert check_select_layers([layer], [(x, y)], 1e-4)["worst_matching_fraction"] == 1.0
    tie = y.clone()
    tie[0, 7] += 0.5  # one token of 400 (0.25%) off, as after a flipped neuron
    assert SELECT_FLIP_FRACTION > 1 / 400
    assert check_select_layers([layer], [(x, tie)], 1e-4)["worst_matching_fraction"] == pytest.approx(399 / 400)
    wrong = FrozenSelectFFN(d, n, n, "silu")
    wrong.gate_up.data.copy_(layer.gate_up.data[:, torch.randperm(2 * n)])  # neurons repacked out of order
    wrong.down.data.copy_(layer.down.data)
    wrong.x_threshold.copy_(layer.x_threshold), wrong.h_threshold.copy_(layer.h_threshold)
    with pytest.raises(FreezeCheckError, match="layer 0: .* freeze bug"):
        check_select_layers([wrong], [(x, y)], 1e-4)


def test_validate_onnx_rows_name_the_selector_node(frozen, workdir, tmp_path):
    """validate --onnx on a selector model's export: the onnxruntime rows say SelectFFN ran its function body."""
    model_dir, fdir, _ = frozen
    mom = workdir / "onnx-validate"
    if not mom.is_dir():
        momcompress.export(fdir, mom, new_tokens=2)
    momcompress.export(model_dir, tmp_path / "dense", dense=True, new_tokens=2)
    report = momcompress.validate(fdir, dense=model_dir, output=tmp_path / "r", onnx_sparse=mom, onnx_dense=tmp_path / "dense",
                                  task_names="none", seq_len=32, heldout_tokens=64, progress=False, prefill_tokens=8,
                                  decode_tokens=2, speed_repeats=1, threads=1)
    ort_cpu = report["speed"]["onnxruntime"]["cpu"]
    assert ort_cpu["experts_path"] == {"dense": None, "sparse": "function body"} and ort_cpu["custom_op"] == "SelectFFN"
    md = (tmp_path / "r" / report["key"] / "report.md").read_text()
    assert "onnxruntime cpu (SelectFFN: function body)" in md and "SelectFFN nodes ran their ONNX function body" in md
    assert "its masks are hard thresholds" in md
