"""optimum's ORTModelForCausalLM on a momcompress export, in a second Python that has optimum-onnx
(it needs transformers < 5, so it cannot share this environment). Opt-in, marker `optimum`:

    python3 -m venv /tmp/venv-optimum && /tmp/venv-optimum/bin/pip install torch==2.13.0 \\
        'transformers==4.57.*' 'optimum-onnx==0.1.0' && /tmp/venv-optimum/bin/pip install -e .
    MOMCOMPRESS_OPTIMUM_PYTHON=/tmp/venv-optimum/bin/python python -m pytest -m optimum tests/test_optimum.py

It exports a tiny frozen model here and runs benchmarks/optimum_check.py there: the export's tokenizer
loads with transformers 4 (AutoTokenizer), and optimum's logits and 16 greedy tokens equal
momcompress.load's (in transformers 4: the frozen config.json must carry its RoPE settings in 4.x's keys
too), through the function body and (when built) the compiled kernel.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import momcompress
from conftest import make_tiny_model_dir
from momcompress.config import LearnConfig

PYTHON_ENV = "MOMCOMPRESS_OPTIMUM_PYTHON"
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "optimum_check.py"


@pytest.mark.optimum
def test_optimum_runs_the_export_like_momcompress_load(tmp_path, data_file, workdir):
    python = os.environ.get(PYTHON_ENV)
    if not python:
        pytest.skip(f"set {PYTHON_ENV} to a Python with transformers 4.57 and optimum-onnx 0.1.0 (see this file's docstring)")
    # a non-default rope_theta (SmolLM2's): transformers 4 ignores transformers 5's rope_parameters unless the
    # config also carries rope_theta (momcompress.models.make_config_portable)
    model_dir = make_tiny_model_dir(workdir / "model", "llama", rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})
    cfg = LearnConfig(target=0.5, selector="experts", experts=4, top_k=2, block_size=4, steps=4, batch_size=4, seq_len=32, data=str(data_file),
                      eval_tokens=256, init_tokens=512, log_every=100, dtype="float32")
    momcompress.learn(str(model_dir), workdir / "run", cfg)
    momcompress.freeze(workdir / "run", workdir / "frozen", tolerance=0.05)
    momcompress.export(workdir / "frozen", workdir / "onnx", new_tokens=4)
    env = {**os.environ, "MOMCOMPRESS_CACHE": str(Path.home() / ".cache" / "momcompress")}  # where build-ops put the kernel
    out = subprocess.run([python, str(SCRIPT), str(workdir / "onnx"), str(workdir / "frozen")], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "transformers 4." in out.stdout and "✓ optimum ORTModelForCausalLM, MoMExperts function body" in out.stdout
    assert "✓ optimum ORTModelForCausalLM, MoMExperts kernel" in out.stdout or "kernel: skipped" in out.stdout


@pytest.mark.optimum
def test_optimum_runs_a_selector_export_like_momcompress(tmp_path, data_file, workdir):
    """A per-token selector export (an If per layer around SelectFFN): optimum agrees with momcompress.load
    with the thresholds off, and with momcompress's own onnxruntime runner with them on."""
    python = os.environ.get(PYTHON_ENV)
    if not python:
        pytest.skip(f"set {PYTHON_ENV} to a Python with transformers 4.57 and optimum-onnx 0.1.0 (see this file's docstring)")
    model_dir = make_tiny_model_dir(workdir / "model-select", "llama", rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})
    cfg = LearnConfig(target=0.5, selector="activations", steps=4, batch_size=4, seq_len=32, data=str(data_file),
                      eval_tokens=256, init_tokens=512, log_every=100, dtype="float32")
    momcompress.learn(str(model_dir), workdir / "run-select", cfg)
    momcompress.freeze(workdir / "run-select", workdir / "frozen-select")
    momcompress.export(workdir / "frozen-select", workdir / "onnx-select", new_tokens=4)
    env = {**os.environ, "MOMCOMPRESS_CACHE": str(Path.home() / ".cache" / "momcompress")}
    out = subprocess.run([python, str(SCRIPT), str(workdir / "onnx-select"), str(workdir / "frozen-select")], capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    for thresholds in ("off", "on"):
        assert f"✓ optimum ORTModelForCausalLM, SelectFFN function body, thresholds {thresholds}" in out.stdout
        assert f"✓ optimum ORTModelForCausalLM, SelectFFN kernel, thresholds {thresholds}" in out.stdout or "kernel: skipped" in out.stdout
