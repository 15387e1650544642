"""`validate`: cost formulas by hand, retention definitions, latency timing, the ONNX runner, the report
files, --min-retention exit codes and bad input, on a tiny learned-and-frozen model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import momcompress
from conftest import SAMPLE_TEXT, TINY_ARCHS, make_tiny_model_dir, tiny_config, write_text_data
from momcompress.cli import main
from momcompress.config import LearnConfig
from momcompress.errors import ConfigError, DataError, ExportError, ModelLoadError, RunDirError
from momcompress.hardware import cpu_name
from momcompress.validate import cost, speed, tasks
from momcompress.validate.tasks import Doc
from momcompress.validate.validator import average_retention

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEQ_LEN, HELDOUT = 32, 256  # tiny evaluation: 8 windows of 32 tokens
FAST = dict(seq_len=SEQ_LEN, heldout_tokens=HELDOUT, progress=False)
FAST_CLI = ["--seq-len", str(SEQ_LEN), "--heldout-tokens", str(HELDOUT)]


# ----------------------------------------------------------------------------- cost by hand


def test_dense_and_mom_cost_by_hand():
    # The conftest tiny llama: V=256, d=64, L=2, H=4, Hkv=2, h=16, F=128, tied; 2 RMSNorms per layer + 1 final.
    shape = cost.ModelShape.from_config(tiny_config("llama"), other_params=2 * 2 * 64 + 64)
    assert shape.attention_weights_per_layer == 64 * 64 + 2 * 64 * 32 + 64 * 64 == 12288
    assert shape.dense_ffn_per_layer == 3 * 64 * 128 == 24576
    assert shape.stored_params() == 256 * 64 + 2 * (12288 + 24576) + 320 == 90432

    dense = cost.dense_cost(shape, context=10)
    assert dense.attention_flops == 2 * (2 * 2 * 4 * 16 * 10) == 5120  # q.k and values, 4 heads x 16, 10 keys
    assert dense.params == 64 + 24576 + 49152 + 0 + 16384 + 320 == 90496  # one embedding row, lm_head read whole
    assert dense.flops == 2 * (24576 + 49152 + 16384) + 5120 == 185344

    # 4 experts, blocks of 8 neurons (3*8*64 = 1536 weights), 4 and 2.5 blocks read on average per layer.
    mom = cost.mom_cost(shape, blocks_read=[4.0, 2.5], block_size=8, num_experts=4, context=10)
    assert (mom.ffn, mom.router) == (1536 * 6.5, 2 * 4 * 64) == (9984, 512)
    assert mom.params == 64 + 24576 + 9984 + 512 + 16384 + 320 == 51840
    assert mom.flops == 2 * (24576 + 9984 + 512 + 16384) + 5120 == 108032
    assert mom.to_dict()["flops"] == mom.flops and mom.to_dict()["params"] == mom.params
    with pytest.raises(ValueError, match="layers"):
        cost.mom_cost(shape, [4.0], 8, 4, 10)


def test_sliding_window_caps_the_attention_context():
    shape = cost.ModelShape.from_config(tiny_config("gemma2"))  # layers alternate sliding (32 tokens) / full
    assert shape.context_per_layer(100) == [32, 100] and shape.context_per_layer(20) == [20, 20]
    assert cost.attention_context_flops(shape, 100) == 4 * 4 * 16 * (32 + 100)
    full = cost.ModelShape.from_config(tiny_config("llama"))
    assert full.context_per_layer(100) == [100, 100]


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_formulas_match_the_real_models(arch):
    """Stored parameters match the model, and active parameters match sizes.active_params_per_token."""
    from transformers import AutoModelForCausalLM

    from momcompress.sizes import active_params_per_token, param_breakdown

    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    shape = cost.ModelShape.from_model(model)
    weights = sum(m.weight.numel() for layer in model.model.layers for m in
                  (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj))
    assert shape.num_layers * shape.attention_weights_per_layer == weights
    assert shape.stored_params() == sum(p.numel() for p in model.parameters())
    assert cost.dense_cost(shape, 8).params == active_params_per_token(model, param_breakdown(model)["ffn"])
    if arch == "llama":
        assert shape.other_params == 2 * 2 * 64 + 64  # the norms, by hand


# ----------------------------------------------------------------------------- retention


def test_average_retention_skips_undefined_tasks():
    per_task = {
        "a": {"retention": {"acc": {"value": 0.8}}},
        "b": {"retention": {"acc": {"value": 1.0}}},
        "c": {"retention": {"acc": {"value": math.nan}}},  # dense accuracy 0
    }
    assert average_retention(per_task, "acc") == pytest.approx(0.9)
    assert math.isnan(average_retention({"c": per_task["c"]}, "acc"))


# ----------------------------------------------------------------------------- latency


def test_timing_is_interleaved_and_reports_median_ratios():
    calls = []

    def runner(name, prefill_s, decode_s):
        def run(tokens, prefill, decode):
            calls.append(name)
            return prefill_s[len([c for c in calls if c == name]) - 1], decode_s * decode

        return run

    runners = {"dense": runner("dense", [9.0, 0.2, 0.1, 0.3], 0.01),
               "sparse": runner("sparse", [9.0, 0.1, 0.05, 0.5], 0.02)}
    out = speed._interleave(runners, torch.arange(10), 6, 4, repeats=3, progress=None)
    assert calls == ["dense", "sparse", "sparse", "dense", "dense", "sparse", "sparse", "dense"]  # order alternates
    p = out["prefill"]
    assert p["dense_ms"] == pytest.approx(200.0)  # warm-up round (9 s) dropped; median of .2 .1 .3
    assert p["sparse_ms"] == pytest.approx(100.0) and p["sparse_ms_range"] == pytest.approx([50.0, 500.0])
    # per-round ratios .5, .5, 1.67: median .5, but the spread (1.17) is wider than |.5 - 1|: flagged
    assert p["ratio"] == pytest.approx(0.5) and p["ratio_range"] == pytest.approx([0.5, 5 / 3]) and p["unstable"]
    d = out["decode"]
    assert d["dense_ms"] == pytest.approx(10.0) and d["ratio"] == pytest.approx(2.0) and not d["unstable"]
    assert d["rounds"] == 3 and out["warmup"] == 1


def test_warmup_rounds_are_dropped_and_still_alternate():
    calls, times = [], iter([5.0, 5.0, 4.0, 4.0, 0.1, 0.2])  # two warm-up rounds, then one timed round

    def run(name):
        def fn(tokens, prefill, decode):
            calls.append(name)
            return next(times), 0.0

        return fn

    out = speed._interleave({"dense": run("dense"), "sparse": run("sparse")}, torch.arange(4), 2, 1, repeats=1,
                            progress=None, warmup=2)
    assert calls == ["dense", "sparse", "sparse", "dense", "dense", "sparse"]
    assert out["prefill"]["dense_ms"] == pytest.approx(100.0) and out["prefill"]["sparse_ms"] == pytest.approx(200.0)


@pytest.mark.parametrize("dense, sparse, unstable", [
    ([1.0, 1.0, 1.0], [0.50, 0.55, 0.60], False),   # ratios .5-.6: spread .1 < |.55 - 1|
    ([1.0, 1.0, 1.0], [0.90, 1.10, 1.00], True),    # ratios .9-1.1 around 1: cannot tell
    ([1.0, 2.0, 1.0], [1.2, 2.4, 1.3], False),      # load doubled round 2 for both: paired ratios stay 1.2-1.3
    ([1.0, 1.0], [1.60, 1.40], False),              # slower, and clearly so: spread .2 < |1.5 - 1|
])
def test_spread_warning_logic(dense, sparse, unstable):
    summary = speed.summarise_rounds(dense, sparse)
    ratios = sorted(s / d for d, s in zip(dense, sparse))
    assert summary["ratio_range"] == pytest.approx([ratios[0], ratios[-1]])
    assert summary["dense_ms_range"] == pytest.approx([1000 * min(dense), 1000 * max(dense)])
    assert summary["unstable"] is unstable
    warning = speed.spread_warning("torch cpu", "decode", summary)
    if unstable:
        assert warning.startswith("torch cpu decode: sparse / dense ranged 0.90-1.10 over 3 rounds, wider than")
    else:
        assert warning is None
    with pytest.raises(ValueError, match="same positive number"):
        speed.summarise_rounds(dense, sparse[:-1])


def test_torch_timing_pins_threads_and_reports_warnings(monkeypatch):
    seen, before = [], torch.get_num_threads()
    # call order: warm-up dense, sparse; round 1 sparse, dense; round 2 dense, sparse
    rounds = iter([(1.0, 1.0), (1.0, 1.0), (1.0, 4.4), (1.0, 1.0), (1.0, 1.0), (1.0, 3.6)])

    def fake_run(model, tokens, prefill, decode):
        seen.append(torch.get_num_threads())
        return next(rounds)

    monkeypatch.setattr(speed, "_torch_run", fake_run)
    out = speed.time_torch({"dense": None, "sparse": None}, torch.arange(12), prefill=8, decode=4, repeats=2, threads=1)
    assert seen == [1] * 6 and torch.get_num_threads() == before and out["threads"] == 1
    assert out["prefill"]["ratio"] == pytest.approx(1.0) and not out["prefill"]["unstable"]
    # decode: dense 1 s, sparse 4.4 s then 3.6 s: paired ratios 4.4 and 3.6, spread .8 < |4 - 1|
    assert out["decode"]["ratio_range"] == pytest.approx([3.6, 4.4]) and out["warnings"] == []


def test_torch_timing_runs_prefill_and_cached_decode(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    out = speed.time_torch({"dense": model, "sparse": model}, torch.arange(3, 15), prefill=8, decode=4, repeats=3)
    assert out["prefill_tokens"] == 8 and out["decode_tokens"] == 4 and out["threads"] == torch.get_num_threads()
    for phase in ("prefill", "decode"):
        r = out[phase]
        assert r["rounds"] == 3
        assert r["dense_ms_range"][0] <= r["dense_ms"] <= r["dense_ms_range"][1]
        assert r["ratio_range"][0] <= r["ratio"] <= r["ratio_range"][1]
        assert r["unstable"] == (r["ratio_range"][1] - r["ratio_range"][0] > abs(r["ratio"] - 1))
    assert len(out["warnings"]) == out["prefill"]["unstable"] + out["decode"]["unstable"]
    with pytest.raises(ValueError, match="tokens"):
        speed.time_torch({"dense": model, "sparse": model}, torch.arange(5), prefill=8, decode=4)


# ----------------------------------------------------------------------------- onnxruntime runner

V, HKV, HD = 256, 2, 4  # synthetic graph: vocabulary (the tiny tokenizer's), kv heads, head dim


def write_toy_onnx(folder, with_cache: bool = True, logits_name: str = "logits"):
    """A causal-LM-shaped ONNX graph: logits = TABLE[input_ids]; the cache appends KEYS[input_ids]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    table, keys = rng.standard_normal((V, V)).astype(np.float32), rng.standard_normal((V, HKV * HD)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info(logits_name, TensorProto.FLOAT, ["batch", "seq", V])]
    nodes = [helper.make_node("Gather", ["table", "input_ids"], [logits_name])]
    inits = [numpy_helper.from_array(table, "table")]
    if with_cache:
        nodes += [helper.make_node("Gather", ["keys", "input_ids"], ["k_flat"]),
                  helper.make_node("Reshape", ["k_flat", "kv_shape"], ["k_heads"]),
                  helper.make_node("Transpose", ["k_heads"], ["k_new"], perm=[0, 2, 1, 3])]  # (B, Hkv, T, h)
        inits += [numpy_helper.from_array(keys, "keys"), numpy_helper.from_array(np.array([0, 0, HKV, HD]), "kv_shape")]
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.0.{kind}", TensorProto.FLOAT,
                                                        ["batch", HKV, "past", HD]))
            outputs.append(helper.make_tensor_value_info(f"present.0.{kind}", TensorProto.FLOAT,
                                                         ["batch", HKV, "total", HD]))
            nodes.append(helper.make_node("Concat", [f"past_key_values.0.{kind}", "k_new"], [f"present.0.{kind}"], axis=2))
    graph = helper.make_graph(nodes, "toy_lm", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "manifest.json").write_text(json.dumps({"stage": "export", "body": "toy"}))
    return folder, table, keys


def test_onnx_runner_prefills_and_decodes_with_the_cache(tmp_path):
    folder, table, keys = write_toy_onnx(tmp_path / "toy")
    lm = speed.open_onnx(folder, threads=1)
    assert lm.has_cache and lm.manifest == {"stage": "export", "body": "toy"} and lm.threads == 1
    ids = np.array([[5, 7, 9]])
    logits, past = lm.run(ids, np.ones((1, 3)), np.arange(3)[None], lm.first_past(1))
    np.testing.assert_array_equal(logits[0], table[[5, 7, 9]])
    assert past[0].shape == (1, HKV, 3, HD)  # past_key_values.0.key
    logits, past = lm.run(np.array([[11]]), np.ones((1, 4)), np.array([[3]]), past)
    np.testing.assert_array_equal(logits[0, 0], table[11])
    assert past[1].shape == (1, HKV, 4, HD)
    np.testing.assert_array_equal(past[0][0, :, 3], keys[11].reshape(HKV, HD))


class _Recording:
    """An OrtCausalLM proxy that records what the timing loop feeds it."""

    def __init__(self, lm):
        self.lm, self.calls = lm, []
        self.has_cache, self.threads, self.first_past = lm.has_cache, lm.threads, lm.first_past

    def run(self, ids, mask, pos, past):
        self.calls.append((ids.tolist(), mask.shape, pos.tolist(), past[0].shape[2] if past else None))
        return self.lm.run(ids, mask, pos, past)


def test_onnx_timing_feeds_the_real_tokens_with_a_growing_cache(tmp_path):
    rec = _Recording(speed.open_onnx(write_toy_onnx(tmp_path / "toy")[0], threads=1))
    tokens = torch.arange(20, 32)
    out = speed.time_onnx({"dense": rec, "sparse": rec}, tokens, prefill=8, decode=4, repeats=2, warmup=1)
    assert len(rec.calls) == 2 * 3 * (1 + 4)  # 2 models x 3 rounds x (prefill + 4 decode steps)
    prefill, *steps = rec.calls[:5]
    assert prefill == ([list(range(20, 28))], (1, 8), [list(range(8))], 0)
    assert steps == [([[20 + t]], (1, t + 1), [[t]], t) for t in range(8, 12)]  # token t after t cached
    assert out["prefill"]["rounds"] == out["decode"]["rounds"] == 2 and out["threads"] == 1
    assert set(out["prefill"]) >= {"dense_ms", "sparse_ms", "dense_ms_range", "ratio", "ratio_range", "unstable"}


def test_onnx_runner_without_cache_and_bad_exports(tmp_path):
    plain = speed.open_onnx(write_toy_onnx(tmp_path / "plain", with_cache=False)[0])
    assert not plain.has_cache and plain.first_past(1) == []
    out = speed.time_onnx({"dense": plain, "sparse": plain}, torch.arange(1, 13), prefill=8, decode=4, repeats=1)
    assert "decode" not in out and "no past_key_values" in out["note"]
    with pytest.raises(speed.OnnxModelError, match="needs input_ids and logits"):
        speed.open_onnx(write_toy_onnx(tmp_path / "odd", logits_name="scores")[0])
    with pytest.raises(speed.OnnxModelError, match="holds no model.onnx"):
        speed.open_onnx(tmp_path)


def test_one_onnx_runner_class():
    from pathlib import Path

    from momcompress.export import causal_lm

    root = Path(momcompress.__file__).parent.parent
    defined = [str(f.relative_to(root)) for folder in ("momcompress", "export", "benchmarks") for f in (root / folder).rglob("*.py")
               if "class OrtCausalLM" in f.read_text()]
    assert defined == ["export/causal_lm.py"] and speed.OrtCausalLM is causal_lm.OrtCausalLM


# ----------------------------------------------------------------------------- a tiny frozen model


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """(dense model folder, frozen folder, held-out text, calibration text, freeze manifest)."""
    work = tmp_path_factory.mktemp("validate")
    model_dir = make_tiny_model_dir(work / "model", "llama")
    calib = write_text_data(work / "calib.txt")
    config = LearnConfig(target=0.5, selector="experts", experts=4, top_k=2, block_size=8, steps=6, batch_size=4, seq_len=32,
                         data=str(calib), eval_tokens=256, init_tokens=512, log_every=100)
    momcompress.learn(str(model_dir), work / "run", config)
    manifest = momcompress.freeze(work / "run", work / "frozen", tolerance=0.05)
    heldout = work / "heldout.txt"
    lines = SAMPLE_TEXT.split("\n")
    heldout.write_text("\n\n".join(" ".join(lines[(5 * i + j) % len(lines)] for j in range(3)) for i in range(40)))
    return model_dir, work / "frozen", heldout, calib, manifest


def _cloze_docs() -> list[Doc]:
    """Sentence endings from SAMPLE_TEXT: each line cut at 2..5 words, its own and two other endings."""
    lines = SAMPLE_TEXT.split("\n")
    docs = []
    for cut in range(2, 6):
        for i, line in enumerate(lines):
            endings = [" " + " ".join(lines[(i + j) % len(lines)].split(" ")[cut:]) for j in range(3)]
            docs.append(Doc(len(docs), tuple((" ".join(line.split(" ")[:cut]), e) for e in endings), gold=0))
    return docs


@pytest.fixture(scope="module")
def known_docs(frozen):
    """Documents whose gold answer is the dense model's acc_norm pick, and the expected acc_norm retention:
    dense accuracy is 1, so retention = the fraction the MoM model picks the same way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, frozen_dir = frozen[:2]
    tok = AutoTokenizer.from_pretrained(frozen_dir)
    candidates = _cloze_docs()
    picks = {}
    for label, model in (("dense", AutoModelForCausalLM.from_pretrained(model_dir)), ("sparse", momcompress.load(frozen_dir))):
        results = tasks.score_docs(model, tok, candidates, progress=False)
        picks[label] = [max(range(3), key=lambda c: r.logprobs[c] / r.num_chars[c]) for r in results]
    agree = [i for i in range(len(candidates)) if picks["dense"][i] == picks["sparse"][i]]
    disagree = [i for i in range(len(candidates)) if picks["dense"][i] != picks["sparse"][i]]
    assert agree, "the tiny MoM model never picks the dense model's answer: the fixture needs other documents"
    chosen = agree[:3] + disagree[:1]
    docs = [Doc(n, candidates[i].choices, picks["dense"][i]) for n, i in enumerate(chosen)]
    return docs, len(agree[:3]) / len(chosen)


@pytest.fixture
def patched_task(monkeypatch, known_docs):
    """"arc_easy" returns the known documents; every other name goes to the real task files."""
    real = tasks.load_task
    monkeypatch.setattr(tasks, "load_task", lambda name, limit=None: known_docs[0] if name == "arc_easy" else real(name, limit))
    return known_docs[1]


def test_dense_export_is_cached_by_fingerprint_and_settings(tmp_path, monkeypatch, tiny_llama_dir):
    from momcompress.export import exporter
    from momcompress.validate import dense_onnx

    monkeypatch.setenv("MOMCOMPRESS_CACHE", str(tmp_path / "cache"))
    exported = []

    def fake_export(model, output, dense, opset):
        assert dense
        exported.append((Path(model), opset))
        Path(output).mkdir(parents=True)
        (Path(output) / "model.onnx").write_bytes(b"onnx")

    monkeypatch.setattr(exporter, "export", fake_export)
    first = dense_onnx.cached_dense_export(tiny_llama_dir, {"opset": 18, "dtype": "float32"})
    again = dense_onnx.cached_dense_export(tiny_llama_dir, {"opset": 18, "dtype": "float32", "experts_body": "moe"})
    other = dense_onnx.cached_dense_export(tiny_llama_dir, {"opset": 20, "dtype": "float32"})
    assert exported == [(tiny_llama_dir, 18), (tiny_llama_dir, 20)]  # once per settings
    assert first == again != other and first.parent == other.parent == tmp_path / "cache" / "onnx-dense"
    from momcompress.models import model_fingerprint

    assert model_fingerprint(tiny_llama_dir)[:12] in first.name and (first / "model.onnx").is_file()
    assert [p.name for p in first.parent.iterdir() if p not in (first, other)] == []  # no temporary folder left
    with pytest.raises(ExportError, match="float32 only"):
        dense_onnx.cached_dense_export(tiny_llama_dir, {"opset": 18, "dtype": "float16"})


def test_report_files_and_measurements(frozen, patched_task, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from momcompress.calibration.data import pack_tokens, read_texts
    from momcompress.freeze.freezer import measure_frozen_ratio

    model_dir, frozen_dir, heldout, _, manifest = frozen
    onnx_dir, _, _ = write_toy_onnx(tmp_path / "onnx")
    out = tmp_path / "reports"
    monkeypatch.setenv("MOMCOMPRESS_CACHE", str(tmp_path / "cache"))  # the dense export is made there, once
    report = momcompress.validate(frozen_dir, dense=model_dir, output=out, data=str(heldout), task_names="arc_easy",
                                  prefill_tokens=8, decode_tokens=2, speed_repeats=2, onnx_sparse=onnx_dir, threads=1,
                                  **FAST)

    # retention definitions: perplexity dense / sparse; zero-shot sparse / dense (dense acc_norm is 1 here)
    ppl = report["perplexity"]
    assert ppl["retention"] == pytest.approx(ppl["dense"] / ppl["sparse"]) and ppl["tokens"] == HELDOUT
    arc = report["zero_shot"]["tasks"]["arc_easy"]
    assert arc["dense"]["acc_norm"] == 1.0
    assert arc["retention"]["acc_norm"]["value"] == pytest.approx(patched_task)
    assert report["gate"]["average_zero_shot_retention"] == pytest.approx(patched_task)

    # the activation ratio and expert usage recorded by the hooks, against freeze's own measurement
    model = momcompress.load(frozen_dir)
    seqs = pack_tokens(AutoTokenizer.from_pretrained(frozen_dir), read_texts(str(heldout)), SEQ_LEN, HELDOUT)
    ratio, per_layer, blocks = measure_frozen_ratio(model, seqs, 8)
    a = report["activation_ratio"]
    assert a["measured"] == pytest.approx(ratio, abs=1e-9) and a["per_layer"] == pytest.approx(per_layer, abs=1e-9)
    assert a["tokens"] == HELDOUT
    assert all(sum(row) == pytest.approx(2.0) for row in report["expert_usage"]["per_layer"])  # top-2 per token

    # cost: the MoM model's active parameters agree with freeze's accounting on the same blocks
    shape = cost.ModelShape.from_model(AutoModelForCausalLM.from_pretrained(model_dir))
    on_freeze_tokens = cost.mom_cost(shape, [r * manifest["num_blocks"] for r in manifest["measured_ratio_per_layer"]],
                                     8, 4, SEQ_LEN)
    assert on_freeze_tokens.params == pytest.approx(manifest["parameters"]["model_active_per_token"], abs=2)
    c = report["cost"]
    assert c["sparse"]["ffn"] == pytest.approx(sum(blocks) * 3 * 8 * 64, abs=1)
    assert c["dense"]["params"] == manifest["parameters"]["dense_model_active_per_token"]
    assert c["flops_ratio"] == pytest.approx(c["sparse"]["flops"] / c["dense"]["flops"]) and c["flops_ratio"] < 1

    # speed in both runtimes, threads pinned, medians with their spread; the dense ONNX export from the cache
    torch_cpu, ort = report["speed"]["torch"]["cpu"], report["speed"]["onnxruntime"]["cpu"]
    for result in (torch_cpu, ort):
        assert result["threads"] == 1 and result["repeats"] == 2 and result["warmup"] == 1
        for phase in ("prefill", "decode"):
            r = result[phase]
            assert r["rounds"] == 2 and r["sparse_ms_range"][0] <= r["sparse_ms"] <= r["sparse_ms_range"][1]
            assert r["unstable"] == (r["ratio_range"][1] - r["ratio_range"][0] > abs(r["ratio"] - 1))
    warnings = [w for result in (torch_cpu, ort) for w in result["warnings"]]
    assert [n for n in report["notes"] if n.startswith("unstable timing: ")] == [f"unstable timing: {w}" for w in warnings]
    assert ort["exports"]["sparse"]["manifest"]["body"] == "toy"
    dense_export = ort["exports"]["dense"]
    assert dense_export["manifest"]["kind"] == "dense" and dense_export["manifest"]["checks"]
    assert Path(dense_export["path"]).parent.parent.resolve() == (tmp_path / "cache" / "onnx-dense").resolve()
    # the dense export really is the dense model: onnxruntime agrees with PyTorch on it
    assert ort["max_abs_logit_diff_vs_torch"]["dense"] < 1e-3

    # files
    folder = out / "frozen"
    on_disk = json.loads((folder / "report.json").read_text())
    assert {"perplexity", "zero_shot", "activation_ratio", "expert_usage", "cost", "speed", "gate", "notes"} <= set(on_disk)
    assert on_disk["perplexity"]["sparse"] == pytest.approx(ppl["sparse"])
    md = (folder / "report.md").read_text()
    assert "| metric | dense | sparse | sparse / dense |" in md and f"| arc_easy | {arc['n']} |" in md
    assert "## Cost per token" in md and "torch cpu" in md and "onnxruntime cpu" in md
    assert report["cpu"] == on_disk["cpu"] == cpu_name() and f"CPU: {cpu_name()}." in md.split("## Latency")[1]
    d = torch_cpu["decode"]
    assert (f"| {d['dense_ms']:.1f} ms/token ({d['dense_ms_range'][0]:.1f}-{d['dense_ms_range'][1]:.1f}) |" in md)
    assert f"{d['ratio']:.2f} ({d['ratio_range'][0]:.2f}-{d['ratio_range'][1]:.2f})" in md
    assert all(f"**Warning**: {w}" in md for w in warnings)
    for png in ("training_curves.png", "blocks_per_layer.png", "expert_usage.png"):
        assert (folder / png).read_bytes()[:8] == PNG_MAGIC and f"]({png})" in md
        assert plt.imread(folder / png).ndim == 3
    index = json.loads((out / "methods.json").read_text())
    assert index["frozen"]["method"] == "mom" and index["frozen"]["activation_ratio"] == pytest.approx(ratio)
    assert (out / "retention_vs_ratio.png").read_bytes()[:8] == PNG_MAGIC
    assert "[frozen](frozen/report.md)" in (out / "report.md").read_text()

    with pytest.raises(RunDirError, match="--overwrite"):
        momcompress.validate(frozen_dir, dense=model_dir, output=out, data=str(heldout), task_names="none",
                             measure_speed=False, **FAST)


def _validate_cli(frozen, out, *extra):
    model_dir, frozen_dir, heldout = frozen[:3]
    args = ["validate", str(frozen_dir), "--dense", str(model_dir), "-o", str(out), "--data", str(heldout), *FAST_CLI, *extra]
    return CliRunner().invoke(main, args)


def test_min_retention_exit_codes(frozen, patched_task, tmp_path):
    common = ["--tasks", "arc_easy", "--no-speed"]
    ok = _validate_cli(frozen, tmp_path / "ok", *common, "--min-retention", str(patched_task))
    assert ok.exit_code == 0, ok.output
    assert "| metric | dense | sparse | sparse / dense |" in ok.output and "passed" in ok.output

    high = min(2.0, patched_task + 0.1)
    bad = _validate_cli(frozen, tmp_path / "bad", *common, "--min-retention", str(high))
    assert bad.exit_code == 1
    assert f"is below --min-retention {high}" in bad.output and "| metric |" in bad.output  # table, then the error
    written = json.loads((tmp_path / "bad" / "frozen" / "report.json").read_text())
    assert written["gate"] == {"min_retention": high, "average_zero_shot_retention": pytest.approx(patched_task),
                               "metric": "acc_norm", "passed": False}

    none = _validate_cli(frozen, tmp_path / "none", "--tasks", "none", "--no-speed", "--min-retention", "0.5")
    assert none.exit_code == 1 and "select at least one task" in none.output


def _other_tokenizer_model(path):
    """A tiny llama whose tokenizer was trained on other text (same vocabulary size, other entries)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    make_tiny_model_dir(path, "llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["Quantum zebras juggle 0123456789 xylophones; vivid fjords!"] * 4, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(path)
    return path


@pytest.mark.parametrize("case", ["architecture", "tokenizer", "not_frozen", "unknown_task", "empty_text",
                                  "short_text", "calibration_text"])
def test_bad_input_gets_a_clear_error(case, frozen, tmp_path):
    model_dir, frozen_dir, heldout, calib, _ = frozen
    args = dict(frozen_dir=frozen_dir, dense=model_dir, output=tmp_path / "r", data=str(heldout), task_names="none",
                measure_speed=False, **FAST)
    expected = {
        "architecture": (ModelLoadError, r"hidden_size 32 \(dense\) vs 64 \(frozen\).*pass --dense"),
        "tokenizer": (ModelLoadError, "tokenizer of .* differs"),
        "not_frozen": (ModelLoadError, "not a frozen MoM model"),
        "unknown_task": (DataError, "Unknown task 'mmlu'; available tasks: arc_easy"),
        "empty_text": (DataError, "no text|empty"),
        "short_text": (DataError, "one window needs 32"),
        "calibration_text": (DataError, "calibration text"),
    }[case]
    if case == "architecture":
        args["dense"] = make_tiny_model_dir(tmp_path / "small", "llama", hidden_size=32)
    elif case == "tokenizer":
        args["dense"] = _other_tokenizer_model(tmp_path / "other-tok")
    elif case == "not_frozen":
        args["frozen_dir"] = model_dir
    elif case == "unknown_task":
        args["task_names"] = "arc_easy,mmlu"
    elif case == "empty_text":
        (tmp_path / "empty.txt").write_text("  \n")
        args["data"] = str(tmp_path / "empty.txt")
    elif case == "short_text":
        (tmp_path / "short.txt").write_text("The river ran cold.")
        args["data"] = str(tmp_path / "short.txt")
    elif case == "calibration_text":
        args["data"] = str(calib)
    with pytest.raises(expected[0], match=expected[1]):
        momcompress.validate(**args)
    assert not (tmp_path / "r").exists()  # nothing written before the inputs are checked


def test_cli_turns_bad_input_into_a_message(frozen, tmp_path):
    result = _validate_cli(frozen, tmp_path / "r", "--tasks", "nope", "--no-speed")
    assert result.exit_code == 1 and "Error: Unknown task 'nope'" in result.output
    with pytest.raises(ConfigError, match="--onnx-dense needs --onnx"):
        momcompress.validate(frozen[1], dense=frozen[0], onnx_dense=tmp_path, **FAST)


def test_cli_times_the_onnx_exports_with_pinned_threads(frozen, tmp_path):
    toy = write_toy_onnx(tmp_path / "toy")[0]
    for flag in ("--onnx", "--onnx-sparse"):  # --onnx-sparse: the older name
        res = _validate_cli(frozen, tmp_path / flag, "--tasks", "none", flag, str(toy), "--onnx-dense", str(toy), "--repeats",
                            "2", "--prefill-tokens", "8", "--decode-tokens", "2", "--threads", "1")
        assert res.exit_code == 0, res.output
        assert "onnxruntime cpu prefill 8 tokens (ms)" in res.output and "onnxruntime cpu decode (ms per token)" in res.output
        written = json.loads((tmp_path / flag / "frozen" / "report.json").read_text())
        assert written["speed"]["onnxruntime"]["cpu"]["threads"] == 1 and written["speed"]["torch"]["cpu"]["threads"] == 1


def test_real_task_files_score_with_a_limit(frozen, tmp_path):
    report = momcompress.validate(frozen[1], dense=frozen[0], output=tmp_path / "r", data=str(frozen[2]),
                                  task_names="arc_easy,winogrande", limit=2, measure_speed=False, **FAST)
    for name in ("arc_easy", "winogrande"):
        t = report["zero_shot"]["tasks"][name]
        assert t["n"] == 2 and set(t["retention"]) == {"acc", "acc_norm"}
    assert any("first 2 documents" in n for n in report["notes"])


@pytest.mark.parametrize("method", ["teal", "wina"])
def test_threshold_baseline_validates_with_its_measured_read_fraction(frozen, tmp_path, method):
    """The TEAL and WINA baselines have no blocks and no router: their cost is the measured read fraction x the FFN,
    plus what their selectors read."""
    from momcompress.baselines.base import BaselineConfig

    model_dir, _, heldout, calib, _ = frozen
    folder = tmp_path / method
    momcompress.baseline(method, str(model_dir), folder,
                         BaselineConfig(target=0.5, tokens=512, eval_tokens=64, seq_len=32, data=str(calib)))
    report = momcompress.validate(folder, dense=model_dir, output=tmp_path / "r", data=str(heldout), task_names="none",
                                  measure_speed=False, **FAST)
    ratio = report["activation_ratio"]["measured"]
    assert 0.3 < ratio < 0.7
    dense_ffn, sparse_ffn = report["cost"]["dense"]["ffn"], report["cost"]["sparse"]["ffn"]
    assert sparse_ffn == pytest.approx(ratio * dense_ffn, rel=1e-4)
    # What their selectors read counts where a router's would: TEAL two thresholds per layer, WINA d + F
    # per-entry scales per layer (the tiny llama: d=64, F=128, 2 layers).
    assert report["cost"]["sparse"]["router"] == {"teal": 2 * 2, "wina": 2 * (64 + 128)}[method]
    assert (tmp_path / "r" / report["key"] / "report.md").is_file()


def test_dense_cache_scores_the_dense_model_once_per_input(frozen, patched_task, tmp_path, monkeypatch):
    """Validations sharing a dense_cache score the dense model once; the report's numbers are unchanged, and
    other windows or documents are scored afresh."""
    from momcompress.validate import validator

    model_dir, frozen_dir, heldout, _, _ = frozen
    calls = {"ppl": [], "score": []}
    real_ppl, real_score = validator._perplexity, tasks.score_docs

    def count_ppl(model, seqs, *a, **k):
        calls["ppl"].append(tuple(seqs.shape))
        return real_ppl(model, seqs, *a, **k)

    def count_score(model, tok, docs, **k):
        calls["score"].append(len(docs))
        return real_score(model, tok, docs, **k)

    monkeypatch.setattr(validator, "_perplexity", count_ppl)
    monkeypatch.setattr(tasks, "score_docs", count_score)
    kw = dict(dense=model_dir, data=str(heldout), task_names="arc_easy", measure_speed=False, overwrite=True, **FAST)
    plain = momcompress.validate(frozen_dir, output=tmp_path / "a", **kw)
    assert len(calls["ppl"]) == 2 and len(calls["score"]) == 2  # dense and sparse each
    cache: dict = {}
    first = momcompress.validate(frozen_dir, output=tmp_path / "b", dense_cache=cache, **kw)
    second = momcompress.validate(frozen_dir, output=tmp_path / "b", dense_cache=cache, **kw)
    assert len(calls["ppl"]) == 2 + 3 and len(calls["score"]) == 2 + 3  # the second call scored the sparse model only
    for report in (first, second):
        assert report["perplexity"] == plain["perplexity"]
        assert report["zero_shot"]["tasks"] == plain["zero_shot"]["tasks"]
    # fewer held-out tokens: other windows, so the dense model is scored again
    momcompress.validate(frozen_dir, output=tmp_path / "b", dense_cache=cache, **{**kw, "heldout_tokens": HELDOUT // 2})
    assert len(calls["ppl"]) == 5 + 2


# ----------------------------------------------------------------------------- plots


def test_training_curves_plot_what_the_control_moved(tmp_path):
    """Projection control logs a per-step gate offset: the panel shows it (and its running sum), not the
    multipliers, which stay 0 under that control; a Lagrangian run's log shows the multipliers."""
    import matplotlib.pyplot as plt

    from momcompress.validate import plots

    projection = [{"step": i + 1, "loss": 1.0, "ratio": 0.9, "target": 0.9, "lambda1": 0.0, "lambda2": 0.0,
                   "offset": off} for i, off in enumerate([-0.5, -0.25, 0.125])]
    title, lines = plots.control_series(projection)
    assert title == "projection control: gate offset"
    assert lines == {"offset per step": [-0.5, -0.25, 0.125], "cumulative offset": [-0.5, -0.75, -0.625]}
    lagrangian = [{**r, "lambda1": 0.1 * r["step"], "lambda2": 0.0} for r in projection]
    for r in lagrangian:
        del r["offset"]
    title, lines = plots.control_series(lagrangian)
    assert title == "Lagrange multipliers" and lines["lambda1"] == pytest.approx([0.1, 0.2, 0.3])
    for records in (projection, lagrangian):
        path = plots.plot_training_curves(records, tmp_path / "curves.png")
        assert path.read_bytes()[:8] == PNG_MAGIC and plt.imread(path).ndim == 3
