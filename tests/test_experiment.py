"""benchmarks/experiment.py end to end on a tiny model: every method built, validated and tabled."""

import json
from pathlib import Path

import pytest

import momcompress
from conftest import load_benchmark, make_tiny_model_dir
from momcompress.baselines.base import measure_ratio

SEQ_LEN, HELDOUT = 32, 256


def _experiment():
    return load_benchmark("experiment")


def _heldout_and_dense_perplexity(model_dir):
    """validate's default held-out windows (SEQ_LEN x HELDOUT tokens) and the dense model's perplexity on them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from momcompress.calibration.data import default_heldout_texts, pack_tokens
    from momcompress.metrics import perplexity

    seqs = pack_tokens(AutoTokenizer.from_pretrained(model_dir), default_heldout_texts(), SEQ_LEN, HELDOUT)
    return seqs, perplexity(AutoModelForCausalLM.from_pretrained(model_dir), seqs, 8)


def test_experiment_builds_validates_and_tables_every_method(tmp_path, text_data, capsys, monkeypatch):
    model = make_tiny_model_dir(tmp_path / "tiny", "llama")
    out, js = tmp_path / "exp", tmp_path / "exp.json"
    argv = [
        "--model", str(model), "--data", str(text_data), "--targets", "0.5", "--steps", "3", "--seq-len", "32",
        "--calibration-tokens", "1024", "--eval-tokens", "256", "--heldout-tokens", "256", "--tasks", "none",
        "--no-speed", "--learn-option", "block_size=8", "--learn-option", "batch_size=2",
        "--learn-option", "init_tokens=256", "-o", str(out), "--json", str(js),
    ]
    exp = _experiment()
    assert exp.main(argv) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [r["method"] for r in rows] == ["mom", "moefication", "prune", "teal", "wina"]
    assert [r["split"] for r in rows] == [None, None, None, "global", "global"]  # the baselines' default split
    # every row's ratio and perplexity, recomputed from its folder on validate's held-out windows
    seqs, dense_ppl = _heldout_and_dense_perplexity(model)
    for r in rows:
        folder = out / f"{r['method']}-t0.5"
        ratio, _, ppl = measure_ratio(momcompress.load(folder), seqs, 8)
        assert r["ratio"] == pytest.approx(ratio, abs=1e-6) and r["ppl"] == pytest.approx(ppl, rel=1e-4)
        assert r["ppl_dense"] == pytest.approx(dense_ppl, rel=1e-4)
        # one rule for every method: the fit meets the target within ±0.01; the held-out ratio either does too
        # or carries a note (tiny model, 256 held-out tokens)
        assert abs(r["fit_ratio"] - 0.5) <= 0.01, r
        assert abs(r["ratio"] - 0.5) <= 0.01 or "held-out ratio" in r["ratio_note"], r
        assert r["calibration_tokens"] > 0
    table = capsys.readouterr().out
    assert "| dense |" in table and "| teal |" in table and "| wina |" in table and "fit ratio" in table
    assert "Ratio rule (all methods): every method fits its threshold on calibration tokens and fails" in table
    assert (out / "validation" / "methods.json").is_file()
    # a second run reuses the built folders and their validations; other validation settings validate again
    from momcompress.validate import validator

    calls = []
    real = validator.validate
    monkeypatch.setattr(validator, "validate", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert exp.main(argv) == 0
    assert calls == [] and json.loads(js.read_text())["rows"] == rows
    assert exp.main([*argv, "--limit", "7"]) == 0
    assert len(calls) == 5
    # another split rebuilds (and validates) only the threshold baselines
    calls.clear()
    assert exp.main([*argv, "--limit", "7", "--split", "equal"]) == 0
    assert len(calls) == 2
    for method in ("teal", "wina"):
        assert json.loads((out / f"{method}-t0.5" / "config.json").read_text())["momcompress"]["split"] == "equal"
    # the frontier: one table and one plot in the report folder; MoM's router counts in what it reads
    assert (out / "experiment.md").is_file() and (out / "frontier.png").stat().st_size > 0
    by = {r["method"]: r for r in rows}
    assert by["mom"]["read_incl_router"] > by["mom"]["ratio"] + 1e-6
    # no router: TEAL reads two thresholds per layer besides, WINA its d + F per-entry scales (tiny model: d 64, F 128)
    ffn = 3 * 64 * 128
    assert by["teal"]["read_incl_router"] == pytest.approx(by["teal"]["ratio"] + 2 / ffn, abs=1e-5)
    assert by["wina"]["read_incl_router"] == pytest.approx(by["wina"]["ratio"] + (64 + 128) / ffn, abs=1e-5)


def test_mom_runs_are_matched_to_their_targets(tmp_path, text_data):
    """--mom-run, repeated, gives MoM one finished learn run per target (an expert-mask run serves mom-experts);
    a run at no listed target is an error."""
    from momcompress.config import LearnConfig

    model = make_tiny_model_dir(tmp_path / "tiny", "llama")
    runs = {}
    for target in (0.4, 0.6):
        runs[target] = tmp_path / f"run{target}"
        momcompress.learn(str(model), runs[target], LearnConfig(target=target, selector="experts", experts=4, block_size=8, steps=3, batch_size=2,
                                                             seq_len=32, data=str(text_data), eval_tokens=256,
                                                             init_tokens=256, log_every=100))
    out, js = tmp_path / "exp", tmp_path / "exp.json"
    base = ["--model", str(model), "--data", str(text_data), "--seq-len", "32", "--heldout-tokens", "256",
            "--tasks", "none", "--no-speed", "--methods", "mom-experts", "-o", str(out), "--json", str(js)]
    exp = _experiment()
    assert exp.main([*base, "--targets", "0.4,0.6", "--mom-run", str(runs[0.6]), "--mom-run", str(runs[0.4])]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [r["target"] for r in rows] == [0.4, 0.6]
    for r in rows:  # each frozen from its own run: the run's token budget, no learn run of its own
        assert r["calibration_tokens"] == 3 * 2 * 32
        assert not (out / f"mom-experts-t{r['target']}-run").exists()
    with pytest.raises(SystemExit):
        exp.main([*base, "--targets", "0.5", "--mom-run", str(runs[0.4])])
    with pytest.raises(SystemExit):
        exp.main([*base, "--targets", "0.4", "--mom-run", str(runs[0.4]), "--mom-run", str(runs[0.4])])
    with pytest.raises(SystemExit):
        exp.main([*base, "--targets", "0.4", "--mom-run", str(tmp_path / "missing")])
