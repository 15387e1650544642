"""TensorRT as far as a machine without a GPU allows: missing_requirements with a broken `tensorrt` wrapper
(runs everywhere), and TensorRT-RTX (marker `trt`, `pip install 'momcompress[trt-rtx]'`) parsing exported
graphs with their functions inlined and building engines for a compute capability without a GPU. The
momcompress plugin path itself (tensorrt.plugin) is not tested here: TensorRT-RTX has no Python plugin API."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

import momcompress
from conftest import make_tiny_model_dir
from momcompress.cli import main
from momcompress.config import LearnConfig
from momcompress.errors import ExportError
from momcompress.export import trt


def test_missing_requirements_lists_a_tensorrt_wrapper_without_libraries(tmp_path, monkeypatch):
    """PyPI's tensorrt wrapper installed without TensorRT's libraries: its import fails; we list it, not raise."""
    package = tmp_path / "tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text('raise ImportError("libnvinfer.so.10: cannot open shared object file")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    missing = trt.missing_requirements()
    assert any("TensorRT's libraries" in m and "libnvinfer.so.10" in m for m in missing)
    with pytest.raises(ExportError, match="TensorRT's libraries"):
        trt.require_tensorrt()
    (package / "__init__.py").write_text('__version__ = "10.3.0"\n')  # importable but too old
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    assert any("TensorRT >= 10.9 (found 10.3.0" in m for m in trt.missing_requirements())


def test_trt_rtx_check_without_tensorrt_rtx_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(trt, "rtx_missing", lambda: "TensorRT-RTX is not installed (pip install 'momcompress[trt-rtx]', i.e. tensorrt-rtx-cu12)")
    with pytest.raises(ExportError, match="--trt-rtx-check needs TensorRT-RTX.*Nothing was written"):
        momcompress.export(tmp_path / "frozen", tmp_path / "out", trt_rtx_check="SM89")
    with pytest.raises(ExportError, match="must be one of SM80, SM86, SM89, SM120"):
        momcompress.export(tmp_path / "frozen", tmp_path / "out", trt_rtx_check="SM70")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def frozen(workdir, data_file):
    pytest.importorskip("tensorrt_rtx")
    model_dir = make_tiny_model_dir(workdir / "model", "llama")
    cfg = LearnConfig(target=0.5, selector="experts", experts=4, top_k=2, block_size=4, steps=4, batch_size=4, seq_len=32, data=str(data_file),
                      eval_tokens=256, init_tokens=512, log_every=100, dtype="float32")
    momcompress.learn(str(model_dir), workdir / "run", cfg)
    momcompress.freeze(workdir / "run", workdir / "frozen", tolerance=0.05)
    return workdir / "frozen"


@pytest.mark.trt
def test_trt_rtx_refuses_the_gather_body_nonzero_and_builds_masked_dense(frozen, tmp_path):
    """The gather body (the default): TensorRT-RTX refuses its NonZero (a plugin it does not ship), so no
    engine and the export fails naming it; masked-dense parses and builds an SM89 engine."""
    res = CliRunner().invoke(main, ["export", str(frozen), "-o", str(tmp_path / "g"), "--new-tokens", "2", "--trt-rtx-check", "SM89"])
    assert res.exit_code == 1 and "✗ TensorRT-RTX parses the graph" in res.output and "refused: NonZero" in res.output
    assert "--experts-body masked-dense" in res.output and not (tmp_path / "g").exists()
    report = trt.check_rtx(_export(frozen, tmp_path / "g2", "gather") / "model.onnx", (2, 16), "SM80")
    assert {n["op_type"] for n in report["refused"]} == {"NonZero"} and not report["parsed"] and not report["built"]
    manifest = momcompress.export(frozen, tmp_path / "md", body="masked-dense", new_tokens=2, trt_rtx_check="SM89")
    rtx = manifest["tensorrt_rtx"]
    assert rtx["parsed"] and rtx["built"] and rtx["engine_bytes"] > 0 and rtx["refused"] == [] and rtx["target"] == "SM89"
    assert manifest["checks"][-1]["ok"] and "no node refused" in manifest["checks"][-1]["detail"]
    assert not (tmp_path / "md" / trt.INLINED_FILE).exists()


@pytest.mark.trt
def test_trt_rtx_builds_the_dense_export_for_every_target(workdir, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    model_dir = make_tiny_model_dir(workdir / "dense-model", "qwen2")
    momcompress.export(model_dir, tmp_path / "d", dense=True, new_tokens=2)
    for target in trt.RTX_TARGETS:
        report = trt.check_rtx(tmp_path / "d" / "model.onnx", (2, 16), target)
        assert report["built"] and report["refused"] == [], (target, report)


def _export(frozen, out, body):
    momcompress.export(frozen, out, body=body, new_tokens=2)
    return out


@pytest.mark.trt
def test_trt_rtx_builds_a_per_token_selector_export_with_bf16_tables(workdir, data_file, tmp_path):
    """The default freeze of a per-token selector (bf16 tables in an fp32 model): its export (an If per layer
    around SelectFFN, the masked-dense function bodies with CastLike of the bf16 tables) parses with no node
    refused and builds an SM89 engine; the export's own --trt-rtx-check line passes."""
    pytest.importorskip("tensorrt_rtx")
    model_dir = make_tiny_model_dir(workdir / "model-select", "llama")
    cfg = LearnConfig(target=0.5, selector="activations", steps=4, batch_size=4, seq_len=32, data=str(data_file),
                      eval_tokens=256, init_tokens=512, log_every=100, dtype="float32")
    momcompress.learn(str(model_dir), tmp_path / "run", cfg)
    momcompress.freeze(tmp_path / "run", tmp_path / "frozen")
    manifest = momcompress.export(tmp_path / "frozen", tmp_path / "onnx", new_tokens=2, trt_rtx_check="SM89")
    rtx = manifest["tensorrt_rtx"]
    assert rtx["parsed"] and rtx["built"] and rtx["refused"] == [] and rtx["engine_bytes"] > 0
    assert manifest["checks"][-1]["ok"] and "no node refused" in manifest["checks"][-1]["detail"]
    import onnx
    from momcompress.export import select_op

    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False)
    inits = {i.name: i.data_type for i in model.graph.initializer}
    assert {inits[n.input[2]] for n in select_op.select_nodes(model)} == {onnx.TensorProto.BFLOAT16}
