"""The package layout: stages are plain functions named like their CLI commands, each stage's code keeps
its own package, and helpers shared across packages live in public modules."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

import momcompress

IMPLEMENTATIONS = {
    "learn": ("momcompress.learn.trainer", "learn"),
    "freeze": ("momcompress.freeze.freezer", "freeze"),
    "export": ("momcompress.export.exporter", "export"),
    "validate": ("momcompress.validate.validator", "validate"),
    "baseline": ("momcompress.baselines.base", "baseline"),
    "load": ("momcompress.runtime.load", "load"),
}


@pytest.mark.parametrize("stage", list(IMPLEMENTATIONS))
def test_each_stage_is_a_plain_function_that_calls_its_implementation(stage, monkeypatch):
    module_name, func_name = IMPLEMENTATIONS[stage]
    module = importlib.import_module(module_name)
    calls = []
    monkeypatch.setattr(module, func_name, lambda *a, **k: calls.append((a, k)) or "result")
    assert isinstance(getattr(momcompress, stage), types.FunctionType)
    assert getattr(momcompress, stage)("in", flag=True) == "result" and calls == [(("in",), {"flag": True})]


def test_stage_packages_are_plain_modules_and_keep_their_code():
    for name in ("learn", "freeze", "export", "validate", "baselines"):
        package = sys.modules[f"momcompress.{name}"]
        assert type(package) is types.ModuleType and hasattr(package, "__path__")
    assert not importlib.util.find_spec("momcompress._stage")


def test_importing_stage_modules_first_keeps_the_functions():
    """In a fresh interpreter, importing a stage's modules before anything else must not turn
    momcompress.learn & co. back into the packages (the import system sets parent attributes)."""
    code = """
import momcompress.learn.trainer
import momcompress.validate.speed
from momcompress.freeze import plan
from momcompress.export.causal_lm import OrtCausalLM
import importlib, types, momcompress, sys
importlib.import_module("momcompress.baselines.teal")
for name in ("learn", "freeze", "export", "validate", "baseline"):
    assert isinstance(getattr(momcompress, name), types.FunctionType), name
assert sys.modules["momcompress.learn"].trainer is sys.modules["momcompress.learn.trainer"]
assert plan.__name__ == "momcompress.freeze.plan"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_import_momcompress_is_light():
    """`import momcompress` (and so `momcompress --help`) does not pull in torch."""
    code = "import sys, momcompress; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_shared_helpers_are_public_in_modelio():
    import torch

    from momcompress import modelio
    from momcompress.errors import ModelLoadError
    from momcompress.freeze import freezer

    assert modelio.detect_activation(torch.nn.SiLU()) == "silu"
    assert modelio.detect_activation(torch.nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert modelio.detect_activation(torch.nn.GELU()) == "gelu"
    with pytest.raises(ModelLoadError, match="ReLU is none of"):
        modelio.detect_activation(torch.nn.ReLU())
    assert set(modelio.library_versions()) == {"torch", "transformers", "python"}
    assert not hasattr(freezer, "_versions") and freezer.write_model_folder is modelio.write_model_folder


def _import_graph() -> dict[str, set[str]]:
    """momcompress's own modules -> the modules they import (module-level and inside functions)."""
    import ast

    top = Path(__file__).resolve().parents[1]
    roots = {"momcompress": top / "momcompress", "momcompress.calibration": top / "calibration",
             "momcompress.export": top / "export", "momcompress.plugins": top / "plugins"}
    mods = {}
    for pkg, root in roots.items():
        for f in root.rglob("*.py"):
            parts = [p for p in f.relative_to(root).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = f
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in mods:
                subs = {f"{node.module}.{a.name}" for a in node.names} & mods.keys()
                graph[m] |= subs if subs else {node.module}  # `from pkg import submodule` names the submodule
            elif isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names} & mods.keys()
    return graph


def test_no_import_cycles_between_modules():
    """The four cycles the house review found (learn/mom <-> models, kernels <-> runtime/mom_ffn,
    runtime/load <-> baselines/load, baselines/base <-> baselines/prune) and any other two-module cycle."""
    graph = _import_graph()
    assert "momcompress.learn.mom" not in graph["momcompress.models"]
    assert not any(m.startswith("momcompress.baselines") for m in graph["momcompress.runtime.load"])
    assert "momcompress.baselines.base" not in graph["momcompress.baselines.prune"]
    pairs = sorted((a, b) for a in graph for b in graph[a] if a < b and a in graph.get(b, ()))
    assert pairs == [], pairs
