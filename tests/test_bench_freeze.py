"""benchmarks/bench_freeze.py on tiny frozen models: the per-token selector, the expert masks and the
synthetic expert plan as columns of one run, the CPU named."""

import json
from pathlib import Path

import pytest

import momcompress
from conftest import load_benchmark, make_tiny_model_dir
from momcompress.config import LearnConfig
from momcompress.hardware import cpu_name

SMALL = dict(target=0.5, steps=3, batch_size=2, seq_len=32, eval_tokens=128, init_tokens=256, log_every=100)


def _bench():
    return load_benchmark("bench_freeze")


@pytest.fixture(scope="module")
def frozen_pair(tmp_path_factory, text_data):
    work = tmp_path_factory.mktemp("bench-freeze")
    model = make_tiny_model_dir(work / "model", "llama")
    out = {}
    for name, extra in (("selector", dict(selector="activations")), ("experts", dict(selector="experts", experts=4, top_k=1, block_size=8))):
        momcompress.learn(str(model), work / f"run-{name}", LearnConfig(data=str(text_data), **SMALL, **extra))
        momcompress.freeze(work / f"run-{name}", work / f"frozen-{name}", tolerance=0.1, table_dtype="model")  # fp32
        out[name] = work / f"frozen-{name}"
    return model, out


def test_selector_and_experts_columns_in_one_run(frozen_pair, tmp_path, capsys):
    model, frozen = frozen_pair
    js = tmp_path / "bench.json"
    argv = ["--frozen", str(frozen["selector"]), "--frozen", str(frozen["experts"]), "--synthetic", "--dense", str(model),
            "--block-size", "16", "--experts", "4", "--tokens", "1,4", "--paths", "fused,masked,union", "--rounds", "1",
            "--prompt-tokens", "4", "--new-tokens", "2", "--threads", "1", "--json", str(js)]
    assert _bench().main(argv) == 0
    out = json.loads(js.read_text())
    assert out["info"]["cpu"] == cpu_name()
    assert [m["name"] for m in out["models"]] == ["selector", "experts", "synthetic"]
    assert [m["kind"] for m in out["models"]] == ["selector", "experts", "experts"]
    ffn = out["ffn"][0]
    # each model forced onto the paths its layers have: the selector has no union path
    assert {"selector", "selector_fused", "selector_masked", "experts_union", "synthetic_union"} <= set(ffn)
    assert "selector_union" not in ffn
    for name in ("selector", "experts", "synthetic"):
        assert out["decode_step"][name]["ratio"] > 0 and out["generate"][name]["tok_s"] > 0
    err = capsys.readouterr().err
    assert f"CPU {cpu_name()}" in err


def test_bf16_tables_beside_dense_with_bf16_ffn(frozen_pair, tmp_path):
    """A selector frozen with bf16 tables (freeze's default in an fp32 model) and its fair reference, dense with bf16 FFN
    weights, as columns."""
    model, frozen = frozen_pair
    bf16 = tmp_path / "frozen-bf16"
    momcompress.freeze(Path(frozen["selector"]).parent / "run-selector", bf16, tolerance=0.1)  # the default: bf16 here
    js = tmp_path / "bench.json"
    argv = ["--frozen", str(bf16), "--dense", str(model), "--dense-ffn-dtype", "bfloat16", "--tokens", "1,4", "--paths", "fused,masked",
            "--rounds", "1", "--prompt-tokens", "4", "--new-tokens", "2", "--threads", "1", "--json", str(js)]
    assert _bench().main(argv) == 0
    out = json.loads(js.read_text())
    assert [(m["name"], m.get("dtype", m.get("ffn_dtype"))) for m in out["models"]] == [
        ("selector", "torch.bfloat16"), ("dense_bf16ffn", "bfloat16")]
    assert {"selector", "selector_masked", "dense_bf16ffn"} <= set(out["ffn"][0]) and "dense_bf16ffn_masked" not in out["ffn"][0]
    assert "selector_fused" not in out["ffn"][0]  # the Numba kernel takes fp32 tables only: not forced on bf16 ones
    assert out["decode_step"]["dense_bf16ffn"]["ratio"] > 0


def test_a_folder_without_frozen_layers_is_refused(frozen_pair, tmp_path):
    model, _ = frozen_pair
    with pytest.raises(SystemExit):
        _bench().main(["--frozen", str(model), "--skip", "ffn,decode,generate"])
