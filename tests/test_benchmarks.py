"""Accuracy benchmarks that have no other test: learning_curve.py, routing_oracle.py and activation_sparsity.py
on a tiny model."""

import json
from pathlib import Path

import pytest
import torch

import momcompress
from conftest import load_benchmark, make_tiny_model_dir
from momcompress.config import LearnConfig
from momcompress.hardware import cpu_name

TINY = dict(selector="experts", experts=4, top_k=1, block_size=8, batch_size=2, seq_len=32, eval_tokens=256, init_tokens=256, log_every=100)


_bench = load_benchmark


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, text_data):
    work = tmp_path_factory.mktemp("bench")
    model = make_tiny_model_dir(work / "model", "llama")
    momcompress.learn(str(model), work / "run", LearnConfig(target=0.5, steps=4, data=str(text_data), **TINY))
    return model, work / "run"


def test_learning_curve_snapshots_and_evaluates_like_learn(tmp_path, text_data, tiny_run, capsys):
    model, _ = tiny_run
    curve, js = _bench("learning_curve"), tmp_path / "curve.json"
    options = [f"--learn-option={k}={json.dumps(v)}" for k, v in {**TINY, "data": str(text_data), "target": 0.5}.items()]
    assert curve.main(["--model", str(model), "--steps", "4", "--at", "2", *options, "-o", str(tmp_path / "c"), "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [r["step"] for r in rows] == [2, 4] and [r["tokens"] for r in rows] == [2 * 64, 4 * 64]
    manifest = json.loads((tmp_path / "c" / "run" / "manifest.json").read_text())["metrics"]
    assert rows[-1]["ppl"] == manifest["perplexity_target_matched"]
    # the same seed and data as the fixture's 4-step run: its final figure is reproduced
    fixture = json.loads((tiny_run[1] / "manifest.json").read_text())["metrics"]
    assert rows[-1]["ppl"] == pytest.approx(fixture["perplexity_target_matched"], rel=1e-4)
    assert all(abs(r["ratio"] - 0.5) < 0.05 and r["ppl"] > 1 for r in rows)
    assert "| 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        curve.main(["--model", str(model), "--steps", "4", "--at", "4", "-o", str(tmp_path / "bad")])


def test_oracle_choice_is_the_closest_expert(tiny_run):
    from momcompress.freeze.freezer import load_learned, read_run, resolve_source
    from momcompress.learn.mom import gate_mode, mom_layers

    run = read_run(tiny_run[1])
    model, _, _ = load_learned(run, resolve_source(run), torch.device("cpu"))
    oracle = _bench("routing_oracle")
    layer = mom_layers(model)[0]
    x = torch.randn(3, 5, layer.mlp.gate_proj.in_features)
    with torch.no_grad(), gate_mode(model, "deterministic"):
        pick = oracle.oracle_choice(layer, x)
        z = layer.gate_values().repeat_interleave(layer.block_size, dim=-1)
        h = layer.mlp.act_fn(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)
        ref = layer.reference_mlp(x)
        errs = torch.stack([(layer.mlp.down_proj(h * z[e]) - ref).pow(2).sum(-1) for e in range(layer.num_experts)], -1)
    assert torch.equal(pick, errs.argmin(-1))
    # inside routing("oracle") the layer sends each token to that expert
    with torch.no_grad(), gate_mode(model, "deterministic"), oracle.routing(model, "oracle"):
        _, top_w, top_i = layer.route(x)
    assert torch.equal(top_i.squeeze(-1), pick) and torch.all(top_w == 1)
    assert "route" not in vars(layer)  # restored


def test_routing_oracle_table(tiny_run, tmp_path, capsys):
    oracle, js = _bench("routing_oracle"), tmp_path / "o.json"
    assert oracle.main([str(tiny_run[1]), "--tokens", "128", "--json", str(js)]) == 0
    result = json.loads(js.read_text())
    assert [r["routing"] for r in result["rows"]] == ["learned", "oracle", "random"]
    for r in result["rows"]:
        assert abs(r["ratio"] - 0.5) < 0.05 and r["ppl"] > 1
    assert result["cpu"] == cpu_name()  # every benchmark names the CPU it ran on
    captured = capsys.readouterr()
    assert "| oracle |" in captured.out and f"CPU: {cpu_name()}" in captured.err
    with pytest.raises(SystemExit):
        oracle.main([str(tiny_run[1]), "--routings", "learned,psychic"])


def test_activation_sparsity_rows_are_what_baseline_reports(tmp_path, text_data, capsys, monkeypatch):
    """Each row's perplexity and held-out ratio are the `baseline` command's own for that method, split and target;
    the dense FFNs are restored between rows; rows in --json are reused."""
    from momcompress.baselines.base import BaselineConfig, baseline

    model = make_tiny_model_dir(tmp_path / "model", "llama")
    study, js = _bench("activation_sparsity"), tmp_path / "study.json"
    argv = ["--model", str(model), "--data", str(text_data), "--tokens", "1024", "--eval-tokens", "256", "--seq-len", "32",
            "--methods", "teal,wina", "--splits", "global,equal", "--targets", "0.4", "--json", str(js)]
    assert study.main(argv) == 0
    saved = json.loads(js.read_text())
    rows = saved["rows"]
    assert saved["cpu"] == cpu_name()
    assert [(r["method"], r["split"]) for r in rows] == [("teal", "global"), ("teal", "equal"), ("wina", "global"), ("wina", "equal")]
    for r in rows[1::2]:
        assert r["x_kept_min"] == r["x_kept_max"] == 0.4
    for r in rows[:3]:  # teal global (after nothing), teal equal (after teal global), wina global (after teal equal)
        cfg = BaselineConfig(target=0.4, tokens=1024, eval_tokens=256, seq_len=32, data=str(text_data), split=r["split"])
        manifest = baseline(r["method"], model, tmp_path / f"{r['method']}-{r['split']}", cfg)
        assert r["ppl"] == pytest.approx(manifest["perplexity"]["baseline"], rel=1e-6)
        assert r["ratio"] == pytest.approx(manifest["measured_ratio"], abs=1e-9)
        assert saved["dense_ppl"] == pytest.approx(manifest["perplexity"]["dense"], rel=1e-6)
    assert rows[0]["ppl"] != rows[2]["ppl"]  # teal and wina differ
    assert "| wina | equal | 0.40 | 0.40 |" in capsys.readouterr().out
    monkeypatch.setattr(study, "study_row", lambda *a, **k: pytest.fail("a saved row was computed again"))
    assert study.main(argv) == 0
