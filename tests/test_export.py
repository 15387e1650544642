"""`export`: the MoMExperts graph contract, onnxruntime vs PyTorch on tiny models of every architecture
(with and without past key/values, left-padded batches, both function bodies), greedy generation, the
dense export, the TensorRT pieces that run without TensorRT, and bad input.

Each architecture is learned (4 steps), frozen and exported once per module (~15 s each on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import momcompress
from conftest import TINY_ARCHS, make_tiny_model_dir
from momcompress.cli import main
from momcompress.config import LearnConfig
from momcompress.errors import ExportError, RunDirError
from momcompress.export import op
from momcompress.export.causal_lm import OrtCausalLM, greedy_generate, prefill_positions
from momcompress.export.checks import prompt_batch, run_checks
from momcompress.export.exporter import export
from momcompress.runtime.mom_ffn import ACTIVATIONS, frozen_layers, routed_experts_grouped

ATOL = 1e-4
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before plugins/triton_aot.py is imported (as tests/test_kernels.py)


_FROZEN: dict[str, object] = {}
_EXPORTED: dict[str, object] = {}


def frozen_dir(workdir, data_file, arch: str):
    """A frozen tiny model of arch (learned 4 steps), built once per module."""
    if arch not in _FROZEN:
        model_dir = make_tiny_model_dir(workdir / f"model-{arch}", arch)
        run = workdir / f"run-{arch}"
        cfg = LearnConfig(target=0.5, selector="experts", experts=4, top_k=2, block_size=8, steps=4, batch_size=4, seq_len=32, data=str(data_file), eval_tokens=256, init_tokens=512, log_every=100)
        momcompress.learn(str(model_dir), run, cfg)
        momcompress.freeze(run, workdir / f"frozen-{arch}", tolerance=0.05)
        _FROZEN[arch] = workdir / f"frozen-{arch}"
    return _FROZEN[arch]


def exported_dir(workdir, data_file, arch: str):
    """The frozen tiny model of arch exported with the default (gather) body: (folder, manifest)."""
    if arch not in _EXPORTED:
        out = workdir / f"onnx-{arch}"
        # 32 greedy tokens (the check) on llama; 8 elsewhere, to keep the module near 3 minutes
        manifest = momcompress.export(frozen_dir(workdir, data_file, arch), out, new_tokens=32 if arch == "llama" else 8)
        _EXPORTED[arch] = (out, manifest)
    return _EXPORTED[arch]


@pytest.fixture(scope="module", autouse=True)
def _clear_caches():
    yield
    _FROZEN.clear()
    _EXPORTED.clear()


def rebody(folder, body: str, target):
    """A copy of an exported folder whose MoMExperts nodes use another function body."""
    shutil.copytree(folder, target)
    model = onnx.load(str(target / "model.onnx"))
    activation = json.loads((target / "config.json").read_text())["momcompress"]["activation"]
    op.attach_function(model, body, activation)
    onnx.save_model(model, target / "model.onnx")
    return target


# -- the MoMExperts node alone -----------------------------------------------------------------------
def _single_node_model(body: str, activation: str, R=6, b=4, d=16, E=3, k=2, opset=18, weights=None):
    """A one-node ONNX model: MoMExperts over given (or random) routed blocks, and those blocks."""
    g = torch.Generator().manual_seed(0)
    if weights is None:
        weights = [torch.randn(R, b, d, generator=g) / 4 for _ in range(3)]
    scale = (torch.rand(E, R, generator=g) > 0.4).float() * torch.rand(E, R, generator=g)
    inits = [numpy_helper.from_array(w.numpy(), n) for w, n in zip([*weights, scale], ["routed_gate", "routed_up", "routed_down", "expert_block_scale"])]
    node = helper.make_node(
        op.OP_TYPE, ["x", "top_w", "top_i", "routed_gate", "routed_up", "routed_down", "expert_block_scale", "acc"], ["out"],
        domain=op.DOMAIN, top_k=k, activation=activation, plugin_namespace=op.PLUGIN_NAMESPACE, plugin_version=op.PLUGIN_VERSION,
    )
    graph = helper.make_graph(
        [node], "mom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", d]), helper.make_tensor_value_info("top_w", TensorProto.FLOAT, ["T", k]),
         helper.make_tensor_value_info("top_i", TensorProto.INT64, ["T", k]), helper.make_tensor_value_info("acc", TensorProto.FLOAT, ["T", d])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["T", d])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(op.DOMAIN, 1), helper.make_opsetid("com.microsoft", 1)])
    op.attach_function(model, body, activation)
    return model, weights, scale


def _route(T, E, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    top_w, top_i = torch.softmax(torch.randn(T, E, generator=g), -1).topk(k)
    return top_w / top_w.sum(-1, keepdim=True), top_i


@pytest.mark.parametrize("body", op.BODIES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("opset", [18, 20])  # 20 has the Gelu op; 18 spells GELU out
def test_function_body_equals_torch_reference(body, activation, opset):
    import onnxruntime as ort

    if body == "moe" and activation != "silu":
        with pytest.raises(ValueError, match="SiLU"):
            op.function_body(body, activation, opset)
        return
    model, (wg, wu, wd), scale = _single_node_model(body, activation, opset=opset)
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for T in (1, 5):
        x, acc = torch.randn(T, 16), torch.randn(T, 16)
        top_w, top_i = _route(T, 3, 2, seed=T)
        (got,) = sess.run(None, {"x": x.numpy(), "top_w": top_w.numpy(), "top_i": top_i.numpy(), "acc": acc.numpy()})
        want = acc + routed_experts_grouped(x, top_w, top_i, wg, wu, wd, scale, activation)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)


def test_gather_body_reads_only_selected_blocks():
    """Blocks no selected expert uses hold NaN: the gather body never touches them, masked-dense does."""
    import onnxruntime as ort

    R, b, d = 6, 4, 16
    weights = [torch.randn(R, b, d) / 4 for _ in range(3)]
    _, _, scale = _single_node_model("gather", "silu", weights=weights)
    top_w, top_i = _route(1, 3, 2)
    unused = scale[top_i[0]].sum(0) == 0  # (R,) blocks outside the token's experts
    assert unused.any()
    for w in weights:
        w[unused] = float("nan")
    feeds = {"x": np.random.randn(1, d).astype(np.float32), "top_w": top_w.numpy(), "top_i": top_i.numpy(), "acc": np.zeros((1, d), np.float32)}
    outs = {}
    for body in ("gather", "masked-dense"):
        model, _, _ = _single_node_model(body, "silu", weights=weights)
        outs[body] = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.isfinite(outs["gather"]).all()
    assert np.isnan(outs["masked-dense"]).any()


# -- tiny models of every architecture ---------------------------------------------------------------
@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_onnxruntime_matches_pytorch(arch, workdir, data_file, tmp_path):
    """Both bodies: logits with and without past (batch 2, left padding) against the frozen model's own
    forward (one pass over the whole prompt), and the export's own checklist (greedy generation included)."""
    folder, manifest = exported_dir(workdir, data_file, arch)
    assert [c["ok"] for c in manifest["checks"]] == [True] * 5
    model = momcompress.load(frozen_dir(workdir, data_file, arch))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids, mask = prompt_batch(tok)
    pos = prefill_positions(mask)
    with torch.no_grad():
        full = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(pos)).logits.numpy()
    activation = json.loads((folder / "config.json").read_text())["momcompress"]["activation"]
    for body in [b for b in op.BODIES if b != "moe" or activation == "silu"]:
        path = folder if body == manifest["experts_body"] else rebody(folder, body, tmp_path / body)
        lm = OrtCausalLM(path / "model.onnx")
        # prefix without past, then the last 4 tokens with the prefix's past: together, the full prompt
        cut = ids.shape[1] - 4
        logits1, present = lm.run(ids[:, :cut], mask[:, :cut], pos[:, :cut], lm.first_past(2))
        logits2, _ = lm.run(ids[:, cut:], mask, pos[:, cut:], present)
        real = mask.astype(bool)
        got = np.concatenate([logits1, logits2], axis=1)
        assert np.abs(got - full)[real].max() <= ATOL, (arch, body)
        if body != manifest["experts_body"] and arch == "llama":  # the whole checklist, greedy generation included
            checks = run_checks(path / "model.onnx", model, tok, new_tokens=8)
            assert all(c.ok for c in checks)


def test_graph_contract(workdir, data_file):
    folder, manifest = exported_dir(workdir, data_file, "llama")
    model = onnx.load(str(folder / "model.onnx"))
    frozen = momcompress.load(frozen_dir(workdir, data_file, "llama"))
    layers = frozen_layers(frozen)
    nodes = op.mom_nodes(model)
    assert len(nodes) == len(layers) == 2
    inits = {t.name: t for t in model.graph.initializer}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*model.graph.value_info, *model.graph.input]}
    for node, layer in zip(nodes, layers):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"top_k": 2, "activation": b"silu", "plugin_namespace": b"momcompress", "plugin_version": b"1"}
        assert len(node.input) == 8
        x, top_w, top_i, g, u, d, s, acc = node.input
        for name, param in ((g, layer.routed_gate), (u, layer.routed_up), (d, layer.routed_down), (s, layer.expert_block_scale)):
            assert tuple(inits[name].dims) == tuple(param.shape)
            np.testing.assert_array_equal(numpy_helper.to_array(inits[name]), param.numpy())
        assert types[top_w] == TensorProto.FLOAT and types[top_i] == TensorProto.INT64
        assert types[x] == TensorProto.FLOAT and types[acc] == TensorProto.FLOAT
    (fn,) = [f for f in model.functions if f.domain == op.DOMAIN and f.name == op.OP_TYPE]
    assert list(fn.input) == list(op.INPUT_NAMES) and {"NonZero", "Gather", "Gemm"} <= {n.op_type for n in fn.node}
    assert {(o.domain, o.version) for o in model.opset_import} >= {("", 18), ("momcompress", 1)}
    dims = {vi.name: [dm.dim_param or dm.dim_value for dm in vi.type.tensor_type.shape.dim] for vi in [*model.graph.input, *model.graph.output]}
    assert dims["input_ids"] == ["batch", "sequence"] and dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["past_key_values.0.key"] == ["batch", 2, "past_sequence", 16]
    assert dims["present.1.value"] == ["batch", 2, "total_sequence", 16] and dims["logits"] == ["batch", "sequence", 256]
    assert manifest["opset"] == 18 and manifest["experts_body"] == "gather" and manifest["kind"] == "mom"
    assert json.loads((folder / "manifest.json").read_text())["checks"] == manifest["checks"]
    assert (folder / "tokenizer.json").is_file() and not (folder / "model.onnx.data").exists()


def test_greedy_generation_32_tokens(workdir, data_file):
    folder, manifest = exported_dir(workdir, data_file, "llama")
    gen = manifest["checks"][-1]
    assert gen["ok"] and gen["detail"] == "32 tokens x 2 prompts identical"
    # and the cache really carries the context: decoding with it equals re-running the whole sequence
    lm = OrtCausalLM(folder / "model.onnx")
    from transformers import AutoTokenizer

    ids, mask = prompt_batch(AutoTokenizer.from_pretrained(folder))
    tokens = greedy_generate(lm, ids, mask, 6)
    full_mask = np.concatenate([mask, np.ones((2, 6), np.int64)], axis=1)
    logits, _ = lm.run(tokens, full_mask, prefill_positions(full_mask), lm.first_past(2))
    assert np.array_equal(logits[:, ids.shape[1] - 1 : -1].argmax(-1), tokens[:, ids.shape[1] :])


def test_cli_prints_checklist_and_fails_on_a_failed_check(workdir, data_file, tmp_path, monkeypatch):
    frozen = frozen_dir(workdir, data_file, "llama")
    source, _ = exported_dir(workdir, data_file, "llama")
    cached = onnx.load(str(source / "model.onnx"))
    from momcompress.export import exporter

    monkeypatch.setattr(exporter, "to_onnx", lambda *a, **k: cached)  # skip re-tracing
    res = CliRunner().invoke(main, ["export", str(frozen), "-o", str(tmp_path / "ok"), "--new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert "✓ logits close without past" in res.output and "✓ greedy generation" in res.output and "wrote" in res.output
    res = CliRunner().invoke(main, ["export", str(frozen), "-o", str(tmp_path / "bad"), "--atol", "1e-12", "--rtol", "0", "--new-tokens", "4"])
    assert res.exit_code == 1
    assert "failed logits close without past" in res.output and "✗ logits close" in res.output and "max diff" in res.output
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.tmp").exists()


def test_dense_export(workdir, data_file, tmp_path):
    model_dir = make_tiny_model_dir(workdir / "model-dense", "qwen2")
    manifest = export(model_dir, tmp_path / "dense", dense=True, new_tokens=8)
    assert manifest["kind"] == "dense" and all(c["ok"] for c in manifest["checks"])
    model = onnx.load(str(tmp_path / "dense" / "model.onnx"))
    assert not op.mom_nodes(model) and not model.functions
    with pytest.raises(ExportError, match="frozen MoM model: export it without --dense"):
        export(frozen_dir(workdir, data_file, "llama"), tmp_path / "x", dense=True)


# -- TensorRT pieces that need no TensorRT ------------------------------------------------------------
def test_stripped_graph_keeps_plugin_attributes(workdir, data_file):
    from momcompress.export.trt import stripped_model

    folder, _ = exported_dir(workdir, data_file, "llama")
    stripped = stripped_model(folder / "model.onnx")
    assert not [f for f in stripped.functions if f.name == op.OP_TYPE]
    nodes = op.mom_nodes(stripped)
    assert len(nodes) == 2
    for n in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_namespace"] == b"momcompress" and attrs["plugin_version"] == b"1"
    assert onnx.load(str(folder / "model.onnx")).functions  # the file on disk keeps its body


def test_plugins_import_without_tensorrt():
    import importlib

    had = "tensorrt" in sys.modules
    plugins = importlib.import_module("momcompress.plugins")
    assert plugins.PLUGIN_ID == "momcompress::MoMExperts"
    assert had or "tensorrt" not in sys.modules


def test_trt_without_tensorrt_errors_and_writes_nothing(workdir, data_file, tmp_path):
    from momcompress.export.trt import missing_requirements

    if not missing_requirements():
        pytest.skip("TensorRT, a GPU and Triton are all here")
    res = CliRunner().invoke(main, ["export", str(frozen_dir(workdir, data_file, "llama")), "-o", str(tmp_path / "e"), "--trt"])
    assert res.exit_code == 1
    assert "--trt needs" in res.output and "Nothing was written" in res.output
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.tmp").exists()


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_aot_kernel_equals_reference(activation):
    """The fused kernel the TensorRT AOT plugin embeds, in Triton's interpreter (or on CUDA)."""
    pytest.importorskip("triton")
    from momcompress.plugins import triton_aot  # triton.jit reads TRITON_INTERPRET (set above) when it decorates

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    for T, d, R, b in ((1, 64, 13, 8), (3, 200, 5, 16)):
        x, acc = torch.randn(T, d, device=dev), torch.randn(T, d, device=dev)
        g, u, dn = (torch.randn(R, b, d, device=dev) / d**0.5 for _ in range(3))
        scale = (torch.rand(4, R, device=dev) > 0.5).float() * torch.rand(4, R, device=dev)
        top_w, top_i = (t.to(dev) for t in _route(T, 4, 2))
        want = acc + routed_experts_grouped(x, top_w, top_i, g, u, dn, scale, activation)
        got = triton_aot.mom_experts(x, top_w, top_i, g, u, dn, scale, acc, activation)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.trt
def test_plugin_registers_with_tensorrt():
    trtp = pytest.importorskip("tensorrt.plugin")
    from momcompress.plugins import register

    assert register("aot") == "momcompress::MoMExperts"
    assert register("aot") == "momcompress::MoMExperts"  # idempotent within a process
    assert hasattr(trtp.op.momcompress, "MoMExperts")


# -- bad input ------------------------------------------------------------------------------------
def test_rejects_a_dense_folder_without_dense(tmp_path, tiny_llama_dir):
    res = CliRunner().invoke(main, ["export", str(tiny_llama_dir), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "--dense" in res.output and "freeze" in res.output
    res = CliRunner().invoke(main, ["export", str(tmp_path), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "not a model folder" in res.output
    assert not (tmp_path / "o").exists()


def test_rejects_existing_output_bad_opset_and_moe_on_gelu(workdir, data_file, tmp_path):
    with pytest.raises(ExportError, match="moe needs a SiLU-gated FFN"):
        export(frozen_dir(workdir, data_file, "gemma"), tmp_path / "g", body="moe")
    frozen = frozen_dir(workdir, data_file, "llama")
    (tmp_path / "exists").mkdir()
    with pytest.raises(RunDirError, match="--overwrite"):
        export(frozen, tmp_path / "exists")
    res = CliRunner().invoke(main, ["export", str(frozen), "-o", str(tmp_path / "o"), "--opset", "17"])
    assert res.exit_code == 1 and "opset 17 is not supported" in res.output and "18-23" in res.output
    assert not (tmp_path / "o").exists()


def test_moe_body_max_blocks_is_the_widest_union_and_stripped_for_tensorrt(workdir, data_file, tmp_path):
    scale = np.array([[1, 0, 0.5, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0.2]], dtype=np.float32)
    assert op.max_blocks(scale, 1) == 4 and op.max_blocks(scale, 2) == 5 and op.max_blocks(scale, 3) == 5
    assert op.max_blocks(np.zeros((2, 3)), 1) == 1
    folder, _ = exported_dir(workdir, data_file, "llama")
    moe = rebody(folder, "moe", tmp_path / "moe")
    model = onnx.load(str(moe / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in op.mom_nodes(model):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["max_blocks"] == op.max_blocks(inits[node.input[6]], attrs["top_k"])
    assert all("max_blocks" not in {a.name for a in n.attribute} for n in op.mom_nodes(op.strip_functions(model)))
    op.attach_function(model, "gather", "silu")  # another body drops it again
    assert all("max_blocks" not in {a.name for a in n.attribute} for n in op.mom_nodes(model))


def test_bench_onnx_times_every_body_and_the_floor(workdir, data_file, tmp_path, capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_onnx.py")
    spec = importlib.util.spec_from_file_location("bench_onnx", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    js = tmp_path / "b.json"
    argv = ["--frozen", str(frozen_dir(workdir, data_file, "llama")), "--dense", str(workdir / "model-llama"), "--workdir", str(tmp_path / "w"),
            "--prefills", "16", "--decode-past", "8", "--decode-tokens", "2", "--repeats", "1", "--settle", "0", "--json", str(js)]
    assert bench.main(argv) == 0
    result = json.loads(js.read_text())
    rows, raw = result["rows"], result["raw_seconds"]
    assert [r["workload"] for r in rows] == ["prefill 16", "decode step, 8 cached"]
    variants = [*(f"mom {body}" for body in op.BODIES), "floor: no routed"]
    for r in rows:  # each figure is the median of its raw rounds, each ratio variant / dense of the same workload
        w = r["workload"]
        assert set(raw[w]) == {"dense", *variants} and all(len(v) == 1 for v in raw[w].values())
        assert r["dense_ms"] == pytest.approx(1e3 * raw[w]["dense"][0])
        for v in variants:
            assert r[f"{v} ms"] == pytest.approx(1e3 * raw[w][v][0])
            assert r[f"{v} ratio"] == pytest.approx(r[f"{v} ms"] / r["dense_ms"])
    assert "decode goal" in capsys.readouterr().out


@pytest.mark.slow
def test_default_model_exports_and_generates(tmp_path):
    """The dense default model: logits within 1e-4 and 32 greedy tokens identical through onnxruntime."""
    manifest = export("default", tmp_path / "default", dense=True)
    assert all(c["ok"] for c in manifest["checks"])


def test_known_harmless_warnings_are_silenced_and_others_are_not():
    import logging
    import warnings

    from momcompress.export.exporter import KNOWN_HARMLESS_LOGGERS, quiet_known_warnings

    logger = logging.getLogger(KNOWN_HARMLESS_LOGGERS[0])
    before = logger.level
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_known_warnings():
            assert logger.level == logging.ERROR
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
            warnings.warn("# The axis name: batch will not be used, since it shares ...", UserWarning)
            warnings.warn("something else is deprecated", FutureWarning)
            warnings.warn("# The axis name: batch will not be used", DeprecationWarning)  # other category: kept
    assert [str(w.message) for w in seen] == ["something else is deprecated", "# The axis name: batch will not be used"]
    assert logger.level == before


def test_export_cli_output_is_the_checklist(workdir, tmp_path):
    """A fresh process, as a user runs it: no third-party noise on stderr around the checklist."""
    import subprocess

    model_dir = make_tiny_model_dir(workdir / "model-quiet", "llama")
    out = subprocess.run([sys.executable, "-m", "momcompress.cli", "export", str(model_dir), "--dense", "-o",
                          str(tmp_path / "o"), "--new-tokens", "4"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "✓ greedy generation" in out.stdout
    for noise in ("torchvision is not installed", "LeafSpec", "The axis name"):
        assert noise not in out.stderr, out.stderr
