"""The `momcompress learn` command: bad input gets one clear message, a non-zero exit, and no output."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from momcompress.cli import main

FAST = ["--selector", "experts", "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--experts", "4", "--eval-tokens", "128"]


def run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_learn_runs_and_prints_metrics(tiny_llama_dir, text_data, tmp_path):
    out = tmp_path / "run"
    res = run(["learn", str(tiny_llama_dir), "-o", str(out), "--data", str(text_data), *FAST])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout[res.stdout.index("{"):])
    assert abs(metrics["expected_ratio"] - 0.5) <= 0.02 and (out / "manifest.json").is_file()


def test_config_file_with_flag_override(tiny_llama_dir, text_data, tmp_path):
    cfg = tmp_path / "learn.yaml"
    cfg.write_text("target: 0.6\nselector: experts\nexperts: 2\ntop-k: 1\nsteps: 4\nbatch_size: 2\nseq_len: 32\neval_tokens: 0\n")
    out = tmp_path / "run"
    res = run(["learn", str(tiny_llama_dir), "-o", str(out), "--data", str(text_data), "--config", str(cfg), "--target", "0.7"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["target"] == 0.7 and manifest["config"]["experts"] == 2


def _unsupported_model(path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "case,extra,code,message",
    [
        ("missing path", ["MISSING"], 1, "does not exist"),
        ("not a model", ["EMPTY_DIR"], 1, "no config.json"),
        ("unsupported", ["GPT2"], 1, "not supported; supported: llama"),
        ("target 1.5", ["MODEL", "--target", "1.5"], 2, "--target"),
        ("target 0", ["MODEL", "--target", "0"], 2, "--target"),
        ("top-k > experts", ["MODEL", "--experts", "2", "--top-k", "3"], 1, "--top-k must be between 1 and --experts"),
        ("block size", ["MODEL", "--block-size", "48"], 1, "does not divide the FFN width 128"),
        ("empty data", ["MODEL", "--data", "EMPTY_TXT"], 1, "No text found"),
        ("too little data", ["MODEL", "--data", "TINY_TXT", "--batch-size", "64"], 1, "tokens"),
        ("output exists", ["MODEL", "--output-exists"], 1, "exists: pass --overwrite"),
        ("resume nothing", ["MODEL", "--resume"], 1, "nothing to resume"),
    ],
)
def test_bad_input(case, extra, code, message, tiny_llama_dir, text_data, tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "tiny.txt").write_text("a few words only")
    subs = {
        "MISSING": str(tmp_path / "nope"), "EMPTY_DIR": str(tmp_path / "empty_dir"), "MODEL": str(tiny_llama_dir),
        "GPT2": str(_unsupported_model(tmp_path / "gpt2")) if case == "unsupported" else "",
        "EMPTY_TXT": str(tmp_path / "empty.txt"), "TINY_TXT": str(tmp_path / "tiny.txt"),
    }
    out = tmp_path / "out"
    args = [subs.get(a, a) for a in extra]
    if "--output-exists" in args:
        args.remove("--output-exists")
        out.mkdir()
    if "--data" not in args:
        args += ["--data", str(text_data)]
    res = run(["learn", *FAST, *args, "-o", str(out)])
    assert res.exit_code == code, res.output
    assert message in res.output, res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out.partial").exists()
    if case != "output exists":
        assert not out.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_identical_gates_rank0_writes(tiny_llama_dir, text_data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "momcompress.cli",
        "learn", str(tiny_llama_dir), "-o", str(out), "--data", str(text_data), *FAST, "--device", "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert len(manifest["rank_checksums"]) == 2 and manifest["rank_checksums"][0] == manifest["rank_checksums"][1]
    assert manifest["train_tokens_seen"] == 6 * 2 * 2 * 32
    # only rank 0 wrote: one run folder, no leftovers
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ddp")) == ["ddp"]
    assert res.stdout.count('"expected_ratio"') == 1


def test_tokens_budget_sets_steps(tiny_llama_dir, text_data, tmp_path):
    out = tmp_path / "tok"
    args = ["learn", str(tiny_llama_dir), "-o", str(out), "--data", str(text_data), *FAST, "--tokens", "640"]
    res = run(args)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["steps"] == 640 // (2 * 32)
