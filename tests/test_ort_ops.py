"""The compiled onnxruntime kernels (export/csrc/momcompress_ort_ops.cc, built by export/ort_ops.py):
MoMExperts, SelectedRowsFFN and SelectFFN against the torch reference and against their ONNX function bodies
(fp32, fp16 and bf16 weights, both work splits), clear errors on bad input and on a library built for a
newer onnxruntime API, the build's cache and CLI, and tiny exported models at b = 1, 4, 16: the kernel
and the function body give the same logits and 32 identical greedy tokens.

The library is built once per session into the real momcompress cache (`.ci/run` builds it first with
`momcompress build-ops`); the tests skip, saying why, only where onnxruntime's headers cannot be fetched.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import momcompress
from conftest import make_tiny_model_dir
from momcompress.cli import main
from momcompress.config import LearnConfig
from momcompress.export import op, ort_ops
from momcompress.export.causal_lm import OrtCausalLM, greedy_generate, prefill_positions
from momcompress.export.checks import prompt_batch, torch_generate
from momcompress.kernels.reference import ACTIVATIONS, expert_rows, routed_experts_grouped, selected_rows_ffn

ONNX_TYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}
# max |kernel - reference| / max |reference|: fp32 differs by summation order only; 16-bit outputs round once more
RTOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Enough tokens that the kernel runs one task per tile of 16 tokens (it splits rows below 2 x cores tiles).
TILED_T = 16 * 2 * (os.cpu_count() or 1) + 5


@pytest.fixture(scope="session")
def ops_build():
    """(library, include folder), built once into the real cache (before the per-test cache isolation)."""
    try:
        library = ort_ops.find_library() or ort_ops.build()
        include = ort_ops.find_headers()
    except ort_ops.OrtOpsUnavailableError as exc:
        pytest.skip(f"the momcompress onnxruntime ops cannot be built here: {exc}")
    return library, include


@pytest.fixture
def library(ops_build, monkeypatch):
    monkeypatch.setenv(ort_ops.ENV_LIBRARY, str(ops_build[0]))
    return ops_build[0]


def _session(model: onnx.ModelProto, library, tmp_path=None):
    """(session, ran the kernel?) for model, with the library registered (None: function body only)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if library is not None:
        so.register_custom_ops_library(str(library))
    opt = None
    if tmp_path is not None:
        opt = tmp_path / f"optimized-{len(list(tmp_path.glob('optimized-*')))}.onnx"
        so.optimized_model_filepath = str(opt)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    kernel = None
    if opt is not None:  # the custom node survives only when a kernel claims it (else its body is inlined)
        kernel = any(n.domain == op.DOMAIN for n in onnx.load(str(opt)).graph.node)
    return sess, kernel


def _to_np(t: torch.Tensor) -> np.ndarray:
    """A tensor as numpy; bfloat16 as its raw bits viewed as onnx's bfloat16 storage (uint16)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _ort_value(t: torch.Tensor):
    if t.dtype == torch.bfloat16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(_to_np(t), onnx_element_type=TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(_to_np(t))


def _out_to_torch(arr: np.ndarray, dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.asarray(arr).view(np.int16).copy()).view(torch.bfloat16).float()
    return torch.from_numpy(np.asarray(arr)).float()


def _init(name: str, t: torch.Tensor) -> onnx.TensorProto:
    if t.dtype == torch.bfloat16:
        return helper.make_tensor(name, TensorProto.BFLOAT16, list(t.shape), _to_np(t).tobytes(), raw=True)
    return numpy_helper.from_array(t.numpy(), name)


def mom_problem(R, b, d, E, k, T, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(R, b, d, generator=g) / d**0.5).to(dtype) for _ in range(3)]  # (R, b, d)
    scale = (torch.rand(E, R, generator=g) > 0.5).float() * (0.5 + 0.5 * torch.rand(E, R, generator=g))  # (E, R)
    scale[-1] = 0  # an expert with no routed block
    top_w, top_i = torch.softmax(torch.randn(T, E, generator=g), -1).topk(k)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    x, acc = (torch.randn(T, d, generator=g).to(dtype) for _ in range(2))
    return x, top_w, top_i, weights, scale, acc


def mom_model(weights, scale, activation, k, dtype=torch.float32, accumulate=True, body="gather", opset=18):
    R, b, d = weights[0].shape
    names = ["routed_gate", "routed_up", "routed_down", "expert_block_scale"]
    inputs = ["x", "top_w", "top_i", *names] + (["acc"] if accumulate else [])
    node = helper.make_node(op.OP_TYPE, inputs, ["out"], domain=op.DOMAIN, top_k=k, activation=activation,
                            plugin_namespace=op.PLUGIN_NAMESPACE, plugin_version=op.PLUGIN_VERSION)
    t = ONNX_TYPES[dtype]
    graph_inputs = [helper.make_tensor_value_info("x", t, ["T", d]), helper.make_tensor_value_info("top_w", TensorProto.FLOAT, ["T", k]),
                    helper.make_tensor_value_info("top_i", TensorProto.INT64, ["T", k])]
    if accumulate:
        graph_inputs.append(helper.make_tensor_value_info("acc", t, ["T", d]))
    graph = helper.make_graph([node], "mom", graph_inputs, [helper.make_tensor_value_info("out", t, ["T", d])],
                              initializer=[_init(n, w) for n, w in zip(names, [*weights, scale])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(op.DOMAIN, 1)])
    if accumulate:
        op.attach_function(model, body, activation)
    return model


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("b", [1, 4, 16])
def test_mom_experts_kernel_equals_reference_and_function_body(library, activation, b, tmp_path):
    R, d, E, k = max(4, 96 // b), 72, 6, 2  # d = 72: 4 full lanes of 16 and a tail of 8
    for T in (1, 3, 40, TILED_T):  # one token; a split tile; split tiles; one task per tile
        x, top_w, top_i, weights, scale, acc = mom_problem(R, b, d, E, k, T, seed=T + b)
        model = mom_model(weights, scale, activation, k)
        feeds = {"x": x.numpy(), "top_w": top_w.numpy(), "top_i": top_i.numpy(), "acc": acc.numpy()}
        sess, ran_kernel = _session(model, library, tmp_path)
        assert ran_kernel
        got = sess.run(None, feeds)[0]
        body = _session(model, None)[0].run(None, feeds)[0]
        want = (acc + routed_experts_grouped(x, top_w, top_i, *weights, scale, activation)).numpy()
        scale_ref = np.abs(want).max()
        assert np.abs(got - want).max() <= RTOL[torch.float32] * scale_ref * 10, (T, np.abs(got - want).max())
        assert np.abs(got - body).max() <= RTOL[torch.float32] * scale_ref * 10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mom_experts_kernel_16_bit(library, dtype, tmp_path):
    """x, weights and accumulate in fp16 / bf16 (fp32 arithmetic inside, output rounded once)."""
    R, b, d, E, k = 24, 4, 40, 5, 2
    for T in (1, 7, TILED_T):
        x, top_w, top_i, weights, scale, acc = mom_problem(R, b, d, E, k, T, dtype=dtype, seed=T)
        sess, ran_kernel = _session(mom_model(weights, scale, "silu", k, dtype=dtype), library, tmp_path)
        assert ran_kernel
        binding = sess.io_binding()
        for name, t in (("x", x), ("top_w", top_w), ("top_i", top_i), ("acc", acc)):
            binding.bind_ortvalue_input(name, _ort_value(t))
        out = torch.zeros(T, d, dtype=dtype)
        out_np = _to_np(out)  # the output lands in this buffer (numpy has no bfloat16)
        binding.bind_ortvalue_output("out", ort.OrtValue.ortvalue_from_numpy_with_onnx_type(out_np, onnx_element_type=ONNX_TYPES[dtype]))
        sess.run_with_iobinding(binding)
        got = _out_to_torch(out_np, dtype)
        want = acc.float() + routed_experts_grouped(x.float(), top_w, top_i, *(w.float() for w in weights), scale, "silu")
        assert (got - want).abs().max() <= RTOL[dtype] * want.abs().max()


def test_mom_experts_fp32_input_with_16_bit_weights(library):
    """bf16 routed blocks under an fp32 model: half the bytes read, the same fp32 output up to the weights' rounding."""
    R, b, d, E, k, T = 32, 1, 64, 4, 1, 3
    x, top_w, top_i, weights, scale, acc = mom_problem(R, b, d, E, k, T)
    w16 = [w.to(torch.bfloat16) for w in weights]
    model = mom_model(weights, scale, "gelu", k)
    for init, w in zip(model.graph.initializer[:3], w16):
        init.CopyFrom(_init(init.name, w))
    sess, _ = _session(model, library)
    got = sess.run(None, {"x": x.numpy(), "top_w": top_w.numpy(), "top_i": top_i.numpy(), "acc": acc.numpy()})[0]
    want = (acc + routed_experts_grouped(x, top_w, top_i, *(w.float() for w in w16), scale, "gelu")).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)


# -- SelectedRowsFFN ----------------------------------------------------------------------------------
def rows_model(gate, up, down, activation, accumulate=True, opset=18):
    R, d = gate.shape
    inputs = ["x", "rows", "scale", "gate_rows", "up_rows", "down_rows"] + (["acc"] if accumulate else [])
    node = helper.make_node(op.SELECTED_ROWS_OP, inputs, ["out"], domain=op.DOMAIN, activation=activation)
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", d]),
                    helper.make_tensor_value_info("rows", TensorProto.INT64, ["T", "K"]),
                    helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["T", "K"])]
    if accumulate:
        graph_inputs.append(helper.make_tensor_value_info("acc", TensorProto.FLOAT, ["T", d]))
    graph = helper.make_graph([node], "rows", graph_inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["T", d])],
                              initializer=[_init(n, w) for n, w in zip(["gate_rows", "up_rows", "down_rows"], [gate, up, down])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(op.DOMAIN, 1)])
    op.attach_selected_rows_function(model, activation)
    return model


def rows_problem(T, K, R, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up, down = ((torch.randn(R, d, generator=g) / d**0.5).to(dtype) for _ in range(3))
    rows = torch.randint(-2, R, (T, K), generator=g)  # negatives are padding; repeats allowed
    rows[:, 0] = torch.randint(0, R, (T,), generator=g)
    scale = torch.rand(T, K, generator=g)
    x, acc = torch.randn(T, d, generator=g), torch.randn(T, d, generator=g)
    return x, rows, scale, (gate, up, down), acc


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("opset", [18, 20])  # 20 has the Gelu op; 18 spells GELU out
def test_selected_rows_kernel_equals_function_body_and_reference(library, activation, dtype, opset, tmp_path):
    op.register_selected_rows_schema()  # the checker's shape inference then knows the node
    onnx.checker.check_model(rows_model(*rows_problem(2, 3, 8, 16, dtype)[3], activation, opset=opset), full_check=True)
    for T, K, R, d in ((1, 5, 20, 33), (6, 12, 40, 64), (TILED_T, 9, 50, 48)):
        x, rows, scale, (gate, up, down), acc = rows_problem(T, K, R, d, dtype, seed=T)
        model = rows_model(gate, up, down, activation, opset=opset)
        sess, ran_kernel = _session(model, library, tmp_path)
        assert ran_kernel
        feeds = {"x": x.numpy(), "rows": rows.numpy(), "scale": scale.numpy(), "acc": acc.numpy()}
        got = sess.run(None, feeds)[0]
        body = _session(model, None)[0].run(None, feeds)[0]
        want = selected_rows_ffn(x, rows, scale, gate, up, down, activation, acc).numpy()
        tol = 1e-5 * np.abs(want).max()
        assert np.abs(got - want).max() <= tol and np.abs(body - want).max() <= tol


def test_selected_rows_without_accumulate(library):
    x, rows, scale, (gate, up, down), _ = rows_problem(4, 6, 16, 24)
    model = rows_model(gate, up, down, "silu", accumulate=False)
    assert [n.op_type for n in model.graph.node] == ["Shape", "ConstantOfShape", op.SELECTED_ROWS_OP]  # zeros for the body
    feeds = {"x": x.numpy(), "rows": rows.numpy(), "scale": scale.numpy()}
    want = selected_rows_ffn(x, rows, scale, gate, up, down, "silu").numpy()
    for lib in (library, None):
        np.testing.assert_allclose(_session(model, lib)[0].run(None, feeds)[0], want, atol=1e-5, rtol=0)
    # the kernel alone also takes a node without accumulate (the library's own optional input)
    del model.graph.node[:2]
    del model.graph.node[0].input[6:]
    np.testing.assert_allclose(_session(model, library)[0].run(None, feeds)[0], want, atol=1e-5, rtol=0)


def test_mom_experts_is_selected_rows_over_the_experts_rows(library):
    """One core: MoMExperts equals SelectedRowsFFN fed each token's rows (its experts' blocks) and scales."""
    R, b, d, E, k, T = 10, 4, 32, 5, 2, 9
    x, top_w, top_i, weights, scale, acc = mom_problem(R, b, d, E, k, T)
    rows, row_scale = expert_rows(top_w, top_i, scale, b)
    flat = [w.reshape(R * b, d) for w in weights]
    mom = _session(mom_model(weights, scale, "silu", k), library)[0].run(None, {"x": x.numpy(), "top_w": top_w.numpy(), "top_i": top_i.numpy(), "acc": acc.numpy()})[0]
    sel = _session(rows_model(*flat, "silu"), library)[0].run(None, {"x": x.numpy(), "rows": rows.numpy(), "scale": row_scale.numpy(), "acc": acc.numpy()})[0]
    np.testing.assert_allclose(mom, sel, atol=1e-5, rtol=0)
    np.testing.assert_allclose(selected_rows_ffn(x, rows, row_scale, *flat, "silu", acc).numpy(), sel, atol=1e-5, rtol=0)


# -- bad input ----------------------------------------------------------------------------------------
def test_bad_inputs_are_clear_onnxruntime_errors(library):
    R, b, d, E, k, T = 6, 2, 16, 3, 2, 2
    x, top_w, top_i, weights, scale, acc = mom_problem(R, b, d, E, k, T)
    model = mom_model(weights, scale, "silu", k)
    for vi in [*model.graph.input, *model.graph.output]:  # any shape reaches the kernel's own checks
        for i, dim in enumerate(vi.type.tensor_type.shape.dim):
            dim.dim_param = f"{vi.name}_{i}"
    sess = _session(model, library)[0]
    feeds = {"x": x.numpy(), "top_w": top_w.numpy(), "top_i": top_i.numpy(), "acc": acc.numpy()}
    with pytest.raises(Exception, match=r"top_i\[1, 0\] = 7 is not an expert id in \[0, 3\)"):
        sess.run(None, {**feeds, "top_i": np.array([[0, 1], [7, 0]], np.int64)})
    with pytest.raises(Exception, match=r"accumulate must have x's type and shape \(2, 16\)"):
        sess.run(None, {**feeds, "acc": np.zeros((2, 8), np.float32)})
    with pytest.raises(Exception, match="must share one type and shape"):  # x's width differs from the blocks'
        sess.run(None, {**feeds, "x": np.zeros((2, 8), np.float32), "acc": np.zeros((2, 8), np.float32)})
    with pytest.raises(Exception, match=r"top_w and top_i must both be \(T, k\)"):
        sess.run(None, {**feeds, "top_w": np.ones((2, 1), np.float32)})
    # wrong dtypes: top_i int32, x double
    model = mom_model(weights, scale, "silu", k)
    model.graph.input[2].type.tensor_type.elem_type = TensorProto.INT32
    with pytest.raises(Exception, match="top_i must be int64, got int32"):
        _session(model, library)[0].run(None, {**feeds, "top_i": top_i.numpy().astype(np.int32)})
    model = mom_model(weights, scale, "silu", k)
    for vi in (model.graph.input[0], model.graph.input[3], model.graph.output[0]):
        vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    with pytest.raises(Exception, match="input x must be float, float16 or bfloat16, got double"):
        _session(model, library)[0].run(None, {**feeds, "x": x.double().numpy(), "acc": acc.double().numpy()})
    model = mom_model(weights, scale, "relu", k, accumulate=False)
    with pytest.raises(Exception, match="activation must be silu, gelu_tanh or gelu, got 'relu'"):
        _session(model, library)
    # SelectedRowsFFN: a row past the tables, and a scale of another shape
    x, rows, rscale, tables, racc = rows_problem(2, 3, 8, 16)
    model = rows_model(*tables, "silu")
    for vi in model.graph.input:
        for i, dim in enumerate(vi.type.tensor_type.shape.dim):
            dim.dim_param = f"{vi.name}_{i}"
    sess = _session(model, library)[0]
    rfeeds = {"x": x.numpy(), "rows": rows.numpy(), "scale": rscale.numpy(), "acc": racc.numpy()}
    with pytest.raises(Exception, match=r"rows\[0, 1\] = 8 is not a row of the \(8, d\) tables"):
        sess.run(None, {**rfeeds, "rows": np.array([[0, 8, 1], [1, 2, 3]], np.int64)})
    with pytest.raises(Exception, match=r"rows and scale must both be \(T, K\)"):
        sess.run(None, {**rfeeds, "scale": np.ones((2, 2), np.float32)})


def test_library_for_a_newer_api_is_refused_clearly(ops_build, tmp_path, monkeypatch):
    """Headers that claim API 999: the build works, and both momcompress and the library itself refuse
    to run in this onnxruntime with a message naming the fix. Builds twice: the second is the cache."""
    headers = tmp_path / "headers"
    shutil.copytree(ops_build[1], headers)
    c_api = headers / "onnxruntime_c_api.h"
    c_api.write_text(c_api.read_text().replace(f"#define ORT_API_VERSION {ort_ops.API_VERSION}", "#define ORT_API_VERSION 999"))
    monkeypatch.setenv(ort_ops.ENV_INCLUDE, str(headers))
    lib = ort_ops.build()
    assert lib.parent.parent == ort_ops.ops_root() and lib.name == ort_ops.LIBRARY_NAME
    assert ort_ops.library_api_version(lib) == 999
    mtime = lib.stat().st_mtime_ns
    assert ort_ops.build() == lib and lib.stat().st_mtime_ns == mtime  # cached: not compiled again
    assert ort_ops.find_library() == lib
    with pytest.raises(ort_ops.OrtOpsVersionError, match=r"onnxruntime C API 999 .* upgrade onnxruntime"):
        ort_ops.register(ort.SessionOptions(), lib)
    so = ort.SessionOptions()
    with pytest.raises(Exception, match="built against onnxruntime C API version 999"):
        so.register_custom_ops_library(str(lib))
    monkeypatch.setenv(ort_ops.ENV_LIBRARY, str(lib))  # what the user sees when a session would use it
    with pytest.raises(ort_ops.OrtOpsVersionError, match="momcompress build-ops --force"):
        ort_ops.register(ort.SessionOptions())


def test_build_without_compiler_or_headers_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    with pytest.raises(ort_ops.OrtOpsUnavailableError, match="no C\\+\\+ compiler"):
        ort_ops.build()
    res = CliRunner().invoke(main, ["build-ops"])
    assert res.exit_code == 0 and "momcompress ops not built" in res.output and "function body" in res.output
    assert "momcompress CPU ops not built" in res.output and "masked path" in res.output
    res = CliRunner().invoke(main, ["build-ops", "--require"])
    assert res.exit_code == 1 and "no C++ compiler" in res.output
    monkeypatch.delenv("CXX")
    monkeypatch.setenv(ort_ops.ENV_INCLUDE, str(tmp_path))
    with pytest.raises(ort_ops.OrtOpsUnavailableError, match="holds no onnxruntime_c_api.h"):
        ort_ops.build()
    res = CliRunner().invoke(main, ["build-ops", "--status"])
    status = json.loads(res.output)
    assert res.exit_code == 0 and status["onnxruntime"]["library"] is None  # this test's cache is empty
    assert set(status["cpu"]) == {"source_hash", "cache", "library"}
    monkeypatch.setenv(ort_ops.ENV_LIBRARY, str(tmp_path / "missing.so"))
    with pytest.raises(ort_ops.OrtOpsError, match="is not a file"):
        ort_ops.find_library()


def test_debian_archive_is_read_from_both_source_formats(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: x-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: x\nComponents: main\nSigned-By: /nonexistent.gpg\n")
    assert ort_ops.debian_archive(tmp_path) == ("http://mirror.example/debian/", str(ort_ops.DEBIAN_KEYRING))
    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    (tmp_path / "sources.list").write_text("# comment\ndeb [arch=amd64] http://other.example/debian x main\n")
    assert ort_ops.debian_archive(tmp_path)[0] == "http://other.example/debian"
    (tmp_path / "sources.list").write_text("deb http://other.example/ubuntu x main\n")
    assert ort_ops.debian_archive(tmp_path) is None


# -- exported models: the kernel against the function body ---------------------------------------------
def _kernel_agrees_with_body(folder, frozen):
    """The export at folder with the kernel and with the function body: prefill logits and one decode step
    within 1e-4 of each other, and the same 32 greedy tokens, also as PyTorch's (momcompress.load(frozen))."""
    kernel = OrtCausalLM(folder, experts="kernel")
    body = OrtCausalLM(folder, experts="body")
    assert (kernel.experts_path, body.experts_path) == (ort_ops.KERNEL, ort_ops.FUNCTION_BODY)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids, mask = prompt_batch(tok)
    pos = prefill_positions(mask)
    got_k, past_k = kernel.run(ids, mask, pos, kernel.first_past(2))
    got_b, past_b = body.run(ids, mask, pos, body.first_past(2))
    real = mask.astype(bool)
    assert np.abs(got_k - got_b)[real].max() <= 1e-4
    nxt = np.full((2, 1), 5, np.int64)  # one decode step on each side's cache
    mask2 = np.concatenate([mask, np.ones_like(nxt)], axis=1)
    step_k, _ = kernel.run(nxt, mask2, pos[:, -1:] + 1, past_k)
    step_b, _ = body.run(nxt, mask2, pos[:, -1:] + 1, past_b)
    assert np.abs(step_k - step_b).max() <= 1e-4
    tokens_k = greedy_generate(kernel, ids, mask, 32)
    assert np.array_equal(tokens_k, greedy_generate(body, ids, mask, 32))
    assert np.array_equal(tokens_k, torch_generate(momcompress.load(frozen), ids, mask, 32))
    return kernel


def _frozen(workdir, data_file, b: int):
    model_dir = make_tiny_model_dir(workdir / f"model-b{b}", "llama")
    run = workdir / f"run-b{b}"
    cfg = LearnConfig(target=0.5, selector="experts", experts=4, top_k=2, block_size=b, steps=4, batch_size=4, seq_len=32, data=str(data_file),
                      eval_tokens=256, init_tokens=512, log_every=100, dtype="float32")
    momcompress.learn(str(model_dir), run, cfg)
    momcompress.freeze(run, workdir / f"frozen-b{b}", tolerance=0.05)
    return workdir / f"frozen-b{b}"


@pytest.mark.parametrize("b", [1, 4, 16])
def test_kernel_and_function_body_same_logits_and_32_greedy_tokens(library, b, workdir, data_file):
    frozen = _frozen(workdir, data_file, b)
    manifest = momcompress.export(frozen, workdir / f"onnx-b{b}", new_tokens=32)
    assert manifest["validation"]["experts_path"] == ort_ops.KERNEL and manifest["validation"]["ops_library"] == str(library)
    names = [c["name"] for c in manifest["checks"]]
    assert "function body logits close without past (onnxruntime without the kernel)" in names
    assert all(c["ok"] for c in manifest["checks"]) and "MoMExperts: kernel" in names[1]
    _kernel_agrees_with_body(workdir / f"onnx-b{b}", frozen)


def test_missing_library_runs_the_function_body_and_names_the_command(workdir, data_file, monkeypatch, caplog):
    frozen = workdir / "frozen-b4" if (workdir / "frozen-b4").is_dir() else _frozen(workdir, data_file, 4)
    folder = workdir / "onnx-nolib"
    monkeypatch.setenv(ort_ops.ENV_LIBRARY, "off")
    manifest = momcompress.export(frozen, folder, new_tokens=4)
    assert manifest["validation"]["experts_path"] == ort_ops.FUNCTION_BODY
    assert not any(c["name"].startswith("function body") for c in manifest["checks"])
    from momcompress.export import causal_lm

    causal_lm._warned.clear()
    with caplog.at_level("WARNING"):
        lm = OrtCausalLM(folder)
    assert lm.experts_path == ort_ops.FUNCTION_BODY and "run `momcompress build-ops`" in caplog.text
    with pytest.raises(ort_ops.OrtOpsError, match="momcompress build-ops"):
        OrtCausalLM(folder, experts="kernel")
    res = CliRunner().invoke(main, ["export", str(frozen), "-o", str(workdir / "onnx-nolib-cli"), "--new-tokens", "2"])
    assert res.exit_code == 0 and "MoMExperts ran its function body" in res.output and "momcompress build-ops" in res.output


def test_bench_onnx_has_a_kernel_column(library, workdir, data_file, tmp_path):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_onnx.py")
    spec = importlib.util.spec_from_file_location("bench_onnx", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    frozen = workdir / "frozen-b4" if (workdir / "frozen-b4").is_dir() else _frozen(workdir, data_file, 4)
    js = tmp_path / "b.json"
    argv = ["--frozen", str(frozen), "--dense", str(workdir / "model-b4"), "--workdir", str(tmp_path / "w"), "--bodies", "gather",
            "--prefills", "16", "--decode-past", "8", "--decode-tokens", "2", "--repeats", "1", "--settle", "0", "--no-floor", "--json", str(js)]
    assert bench.main(argv) == 0
    result = json.loads(js.read_text())
    assert result["experts_paths"] == {"dense": None, "mom gather": "function body", "mom kernel": "kernel"}
    for row in result["rows"]:
        assert row["mom kernel ratio"] == pytest.approx(row["mom kernel ms"] / row["dense_ms"])


def test_validate_onnx_rows_say_which_path_ran(library, workdir, data_file, tmp_path, monkeypatch):
    frozen = workdir / "frozen-b4" if (workdir / "frozen-b4").is_dir() else _frozen(workdir, data_file, 4)
    mom = workdir / "onnx-validate"
    if not mom.is_dir():
        momcompress.export(frozen, mom, new_tokens=2)
    dense = momcompress.export(workdir / "model-b4", tmp_path / "dense", dense=True, new_tokens=2) and tmp_path / "dense"
    from conftest import SAMPLE_TEXT

    lines = SAMPLE_TEXT.split("\n")  # held-out text that is not the calibration text
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n\n".join(" ".join(lines[(5 * i + j) % len(lines)] for j in range(3)) for i in range(40)))
    fast = dict(task_names="none", seq_len=32, heldout_tokens=64, progress=False, prefill_tokens=8, decode_tokens=2,
                speed_repeats=1, threads=1, data=str(heldout))
    for env, path in ((str(library), "kernel"), ("off", "function body")):
        monkeypatch.setenv(ort_ops.ENV_LIBRARY, env)
        report = momcompress.validate(frozen, dense=str(workdir / "model-b4"), output=tmp_path / path, onnx_sparse=mom,
                                      onnx_dense=dense, **fast)
        ort_cpu = report["speed"]["onnxruntime"]["cpu"]
        assert ort_cpu["experts_path"] == {"dense": None, "sparse": path}
        md = (tmp_path / path / report["key"] / "report.md").read_text()
        assert f"onnxruntime cpu (MoMExperts: {path})" in md
        assert ("ran the compiled momcompress kernel" in md) == (path == "kernel")
        assert ("build it with `momcompress build-ops`" in md) == (path != "kernel")


# -- SelectFFN: the per-token selector's node ------------------------------------------------------------
def select_problem(T, d, n, dtype=torch.float32, seed=0):
    """x (T, d) fp32-representable in dtype, thresholds that keep about half of the channels and neurons
    (some shared: -1, some pruned: inf), weights (d, 2n) and (n, d)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(dtype)
    x_thr = torch.rand(d, generator=g) * 1.3
    x_thr[0], x_thr[1] = -1.0, float("inf")
    gate_up = (torch.randn(d, 2 * n, generator=g) / d**0.5).to(dtype)
    down = (torch.randn(n, d, generator=g) / n**0.5).to(dtype)
    h_thr = torch.rand(n, generator=g) * 0.15
    h_thr[0], h_thr[-1] = -1.0, float("inf")
    return x, x_thr, gate_up, down, h_thr


def select_model(x_thr, gate_up, down, h_thr, activation, opset=18, x_dtype=None):
    from momcompress.export import select_op

    dtype = x_dtype or gate_up.dtype
    d = gate_up.shape[0]
    node = helper.make_node(select_op.OP_TYPE, ["x", "x_threshold", "gate_up", "down", "h_threshold"], ["out"],
                            domain=op.DOMAIN, activation=activation)
    graph = helper.make_graph(
        [node], "select", [helper.make_tensor_value_info("x", ONNX_TYPES[dtype], ["T", d])],
        [helper.make_tensor_value_info("out", ONNX_TYPES[dtype], ["T", d])],
        initializer=[_init("x_threshold", x_thr), _init("gate_up", gate_up), _init("down", down), _init("h_threshold", h_thr)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(op.DOMAIN, op.DOMAIN_VERSION)])
    model.functions.append(select_op.function_body(activation, opset, widen_tables=dtype != gate_up.dtype))
    return model


def _select_want(x, x_thr, gate_up, down, h_thr, activation):
    from momcompress.kernels.reference import select_ffn_reference

    return select_ffn_reference(x.float(), x_thr, gate_up.float(), down.float(), h_thr, activation)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("T", [1, 3, 8, 9, 40])
def test_select_ffn_kernel_equals_reference_and_function_body(library, activation, T, tmp_path):
    """fp32: up to 8 tokens the kernel reads rows (T = 1, 3, 8), beyond it runs onnxruntime's MatMul over
    the masked inputs (T = 9, 40); both equal the torch formula and the node's function body."""
    d, n = 40, 400  # n is not a multiple of the kernel's neuron chunk (192)
    x, x_thr, gu, dn, h_thr = select_problem(T, d, n, seed=T)
    model = select_model(x_thr, gu, dn, h_thr, activation)
    sess, ran_kernel = _session(model, library, tmp_path)
    assert ran_kernel
    got = sess.run(None, {"x": x.numpy()})[0]
    body = _session(model, None)[0].run(None, {"x": x.numpy()})[0]
    want = _select_want(x, x_thr, gu, dn, h_thr, activation).numpy()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-5 * scale and np.abs(body - want).max() <= 1e-5 * scale
    assert np.abs(want).max() > 0 and (want != 0).any(axis=1).all()


@pytest.mark.parametrize("max_tokens", ["0", "100"])
def test_select_ffn_both_paths_agree_at_any_token_count(library, monkeypatch, max_tokens):
    """MOMCOMPRESS_ORT_SELECT_MAX_TOKENS moves the switch between the row path and the MatMul path: 0
    sends every call to MatMul, 100 every call here to the rows; the outputs agree."""
    monkeypatch.setenv("MOMCOMPRESS_ORT_SELECT_MAX_TOKENS", max_tokens)
    x, x_thr, gu, dn, h_thr = select_problem(24, 40, 50, seed=3)  # 50 neurons: not a multiple of 16
    got = _session(select_model(x_thr, gu, dn, h_thr, "silu"), library)[0].run(None, {"x": x.numpy()})[0]
    want = _select_want(x, x_thr, gu, dn, h_thr, "silu").numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 20])
def test_select_ffn_kernel_16_bit(library, dtype, T):
    """16-bit weights and x: the kernel reads the rows in their type (any token count) and computes in fp32."""
    x, x_thr, gu, dn, h_thr = select_problem(T, 40, 400, dtype=dtype, seed=5)
    sess = _session(select_model(x_thr, gu, dn, h_thr, "silu"), library)[0]
    binding = sess.io_binding()
    binding.bind_ortvalue_input("x", _ort_value(x))
    out_np = _to_np(torch.zeros(T, 40, dtype=dtype))  # the output lands in this buffer (numpy has no bfloat16)
    binding.bind_ortvalue_output("out", ort.OrtValue.ortvalue_from_numpy_with_onnx_type(out_np, onnx_element_type=ONNX_TYPES[dtype]))
    sess.run_with_iobinding(binding)
    got = _out_to_torch(out_np, dtype)
    want = _select_want(x, x_thr, gu, dn, h_thr, "silu")
    assert (got - want).abs().max() <= RTOL[dtype] * want.abs().max()


@pytest.mark.parametrize("T", [5, 40, 100])
@pytest.mark.parametrize("amx", ["on", "off"])
def test_select_ffn_bf16_tables_fp32_x_at_any_token_count(library, monkeypatch, T, amx):
    """bf16 tables beside fp32 x (freeze --table-dtype bfloat16): from 5 tokens on, on a CPU with AMX-BF16, the kernel
    runs the AMX tile products (MOMCOMPRESS_AMX=off: the rows); fp32 arithmetic on the bf16 tables either way, the
    same as the node's function body."""
    monkeypatch.setenv("MOMCOMPRESS_AMX", amx)
    monkeypatch.setenv("MOMCOMPRESS_ORT_SELECT_MAX_TOKENS", "1000")  # no MatMul path: rows or AMX
    x, x_thr, gu, dn, h_thr = select_problem(T, 40, 400, seed=7)
    gu, dn = gu.to(torch.bfloat16), dn.to(torch.bfloat16)
    model = select_model(x_thr, gu, dn, h_thr, "silu", x_dtype=torch.float32)
    got = _session(model, library)[0].run(None, {"x": x.numpy()})[0]
    body = _session(model, None)[0].run(None, {"x": x.numpy()})[0]
    want = _select_want(x, x_thr, gu, dn, h_thr, "silu").numpy()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-5 * scale and np.abs(body - want).max() <= 1e-5 * scale


def test_select_ffn_bad_inputs_are_clear_errors(library, monkeypatch):
    x, x_thr, gu, dn, h_thr = select_problem(2, 16, 24)
    model = select_model(x_thr, gu, dn, h_thr, "silu")
    for name, value in [("h_threshold", torch.zeros(23)), ("x_threshold", torch.zeros(15))]:
        m = select_model(x_thr if name != "x_threshold" else value, gu, dn, h_thr if name != "h_threshold" else value, "silu")
        with pytest.raises(Exception, match=rf"{name} must be"):
            _session(m, library)[0].run(None, {"x": x.numpy()})
    m = select_model(x_thr, gu, dn[:, :8].contiguous(), h_thr, "silu")  # down's width is not d
    with pytest.raises(Exception, match=r"gate_up must be \(d, 2F'\) and down \(F', d\)"):
        _session(m, library)[0].run(None, {"x": x.numpy()})
    m = select_model(x_thr.double(), gu, dn, h_thr, "silu")  # fp64 thresholds
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(x_thr.double().numpy(), "x_threshold"))
    with pytest.raises(Exception, match="x_threshold must be float, got double"):
        _session(m, library)[0].run(None, {"x": x.numpy()})
    with pytest.raises(Exception, match="activation must be silu, gelu_tanh or gelu, got 'relu'"):
        _session(select_model(x_thr, gu, dn, h_thr, "relu"), library)
    monkeypatch.setenv("MOMCOMPRESS_ORT_SELECT_MAX_TOKENS", "many")
    with pytest.raises(Exception, match="MOMCOMPRESS_ORT_SELECT_MAX_TOKENS must be a whole number"):
        _session(model, library)


def _frozen_selector(workdir, data_file):
    folder = workdir / "frozen-select"
    if not folder.is_dir():
        model_dir = make_tiny_model_dir(workdir / "model-select", "llama")
        cfg = LearnConfig(target=0.5, selector="activations", steps=4, batch_size=4, seq_len=32, data=str(data_file),
                          eval_tokens=256, init_tokens=512, log_every=100, dtype="float32")
        momcompress.learn(str(model_dir), workdir / "run-select", cfg)
        momcompress.freeze(workdir / "run-select", folder)
    return folder


def test_selector_export_kernel_and_function_body_same_logits_and_32_greedy_tokens(library, workdir, data_file):
    """A per-token selector's export: its checks run the kernel (and the body), and with the file's own
    thresholds the kernel gives the body's logits (prefill: the MatMul path; decode: the row path) and the
    same 32 greedy tokens as the body and as PyTorch."""
    frozen = _frozen_selector(workdir, data_file)
    folder = workdir / "onnx-select"
    manifest = momcompress.export(frozen, folder, new_tokens=32)
    assert manifest["validation"]["experts_path"] == ort_ops.KERNEL and manifest["validation"]["ops_library"] == str(library)
    names = [c["name"] for c in manifest["checks"]]
    assert all(c["ok"] for c in manifest["checks"])
    assert "SelectFFN: kernel" in names[1] and "function body logits close without past (onnxruntime without the kernel)" in names
    assert any(n.startswith("SelectFFN nodes alone") and n.endswith("(kernel)") for n in names)
    assert _kernel_agrees_with_body(folder, frozen).custom_op == "SelectFFN"


def test_selector_export_routes_by_token_count_and_the_switch_can_move(library, workdir, data_file):
    """Each layer's If sends calls of up to momcompress_select_row_tokens tokens to SelectFFN and longer ones
    to MatMul + SelectHidden + MatMul; moving the switch in a session (no re-export) changes nothing but
    the path: prefill logits agree within 1e-4 whichever branch ran, with and without the kernel."""
    from momcompress.export import select_op

    frozen = _frozen_selector(workdir, data_file)
    folder = workdir / "onnx-select-route"
    if not folder.is_dir():
        momcompress.export(frozen, folder, new_tokens=2)
    model = onnx.load(str(folder / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert int(inits[select_op.ROW_TOKENS_NAME]) == select_op.DEFAULT_ROW_TOKENS
    hidden = [n for n in select_op.iter_nodes(model.graph) if n.op_type == select_op.HIDDEN_OP]
    assert len(hidden) == len(select_op.select_nodes(model)) == 2
    from transformers import AutoTokenizer

    ids, mask = prompt_batch(AutoTokenizer.from_pretrained(folder))
    pos = prefill_positions(mask)
    real = mask.astype(bool)
    logits = []
    for experts in ("kernel", "body"):
        for row_tokens in (0, 10**6):  # always MatMul, always SelectFFN
            lm = OrtCausalLM(folder, experts=experts, initializers={select_op.ROW_TOKENS_NAME: np.array(row_tokens, np.int64)})
            logits.append(lm.run(ids, mask, pos, lm.first_past(2))[0][real])
    assert max(np.abs(a - logits[0]).max() for a in logits) <= 1e-4


def test_selector_export_with_bf16_tables(library, workdir, data_file):
    """freeze --table-dtype bfloat16: the file keeps the tables in bf16 (the rest fp32); the kernel reads them as they
    are, the body and the MatMul branch widen them; kernel and body agree, on both branches, and give PyTorch's 32
    greedy tokens."""
    from momcompress.export import select_op

    _frozen_selector(workdir, data_file)
    frozen = workdir / "frozen-select-bf16"
    momcompress.freeze(workdir / "run-select", frozen, table_dtype="bfloat16")
    folder = workdir / "onnx-select-bf16"
    manifest = momcompress.export(frozen, folder, new_tokens=32)
    assert all(c["ok"] for c in manifest["checks"]) and manifest["validation"]["experts_path"] == ort_ops.KERNEL
    model = onnx.load(str(folder / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    nodes = select_op.select_nodes(model)
    assert {inits[n.input[2]].data_type for n in nodes} == {inits[n.input[3]].data_type for n in nodes} == {TensorProto.BFLOAT16}
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    body = next(f for f in model.functions if f.name == select_op.OP_TYPE)
    assert [n.op_type for n in body.node[:2]] == ["CastLike", "CastLike"]
    assert sum(n.op_type == "Cast" and n.name.endswith("_wide") for n in select_op.iter_nodes(model.graph)) == 2 * len(nodes)
    _kernel_agrees_with_body(folder, frozen)
    from transformers import AutoTokenizer

    ids, mask = prompt_batch(AutoTokenizer.from_pretrained(folder))
    pos, real = prefill_positions(mask), mask.astype(bool)
    logits = []
    for experts in ("kernel", "body"):
        for row_tokens in (0, 10**6):  # always MatMul (widened tables), always SelectFFN
            lm = OrtCausalLM(folder, experts=experts, initializers={select_op.ROW_TOKENS_NAME: np.array(row_tokens, np.int64)})
            logits.append(lm.run(ids, mask, pos, lm.first_past(2))[0][real])
    assert max(np.abs(a - logits[0]).max() for a in logits) <= 1e-4
    # with the kernel and bf16 tables on a CPU with AMX, long calls go to SelectFFN's AMX path (the session runs the
    # graph without the If nodes)
    lm = OrtCausalLM(folder, experts="kernel")
    amx = ort_ops.amx_usable(lm.ops_library)
    assert lm.long_calls == ("amx" if amx else "matmul") and lm.row_switch_removed == amx
    body = OrtCausalLM(folder, experts="body")
    assert body.long_calls == "matmul" and not body.row_switch_removed
    assert np.abs(lm.run(ids, mask, pos, lm.first_past(2))[0][real] - logits[0]).max() <= 1e-4
    if amx:  # the switch moved instead (a caller's own value is kept as it is): the same logits
        kept = OrtCausalLM(folder, experts="kernel", initializers={select_op.ROW_TOKENS_NAME: np.array(10**6, np.int64)})
        assert kept.long_calls == "matmul" and not kept.row_switch_removed
        assert np.abs(kept.run(ids, mask, pos, kept.first_past(2))[0][real] - logits[0]).max() <= 1e-4


def test_unroute_undoes_route_by_tokens():
    """select_op.unroute: each If on the token count becomes its SelectFFN node again, writing the If's output, and
    the count's Shape / Squeeze / LessOrEqual and the switch's initializer go; other Ifs and nodes stay."""
    from momcompress.export import select_op

    d, n = 8, 16
    nodes, inits = [], []
    for i in range(2):
        nodes.append(helper.make_node(select_op.OP_TYPE, [f"x{i}", f"xt{i}", f"gu{i}", f"dn{i}", f"ht{i}"], [f"x{i + 1}"],
                                      domain=op.DOMAIN, activation="silu", name=f"sel{i}"))
        inits += [_init(f"xt{i}", torch.zeros(d)), _init(f"gu{i}", torch.zeros(d, 2 * n)), _init(f"dn{i}", torch.zeros(n, d)),
                  _init(f"ht{i}", torch.zeros(n))]
    nodes.append(helper.make_node("Relu", ["x2"], ["y"], name="relu"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["T", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", d])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(op.DOMAIN, op.DOMAIN_VERSION)])
    before = [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    assert select_op.route_by_tokens(model, 4) == 2
    assert [n.op_type for n in model.graph.node].count("If") == 2
    assert select_op.unroute(model) == 2
    assert [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node] == before
    assert select_op.ROW_TOKENS_NAME not in {i.name for i in model.graph.initializer}
    assert select_op.unroute(model) == 0  # nothing left to undo


def test_select_hidden_kernel_equals_its_function_body(library):
    """SelectHidden alone: the kernel and its function body (fp32), and the kernel in bf16."""
    from momcompress.export import select_op

    g = torch.Generator().manual_seed(0)
    for activation in sorted(ACTIVATIONS):
        for T in (1, 37):
            gu = torch.randn(T, 2 * 50, generator=g)
            thr = torch.rand(50, generator=g) * 0.3
            thr[0], thr[1] = -1.0, float("inf")
            node = helper.make_node(select_op.HIDDEN_OP, ["gu", "h_threshold"], ["h"], domain=op.DOMAIN, activation=activation)
            graph = helper.make_graph([node], "hidden", [helper.make_tensor_value_info("gu", TensorProto.FLOAT, ["T", 100])],
                                      [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["T", 50])], initializer=[_init("h_threshold", thr)])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(op.DOMAIN, op.DOMAIN_VERSION)])
            model.functions.append(select_op.hidden_function(activation, 18))
            got = _session(model, library)[0].run(None, {"gu": gu.numpy()})[0]
            body = _session(model, None)[0].run(None, {"gu": gu.numpy()})[0]
            h = ACTIVATIONS[activation](gu[:, 0::2]) * gu[:, 1::2]
            want = (h * (h.abs() > thr)).numpy()
            assert np.abs(got - want).max() <= 1e-5 and np.abs(body - want).max() <= 1e-5
            assert (got[:, 1] == 0).all() and (got[:, 0] != 0).all()
