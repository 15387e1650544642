"""What the CPU is, for benchmark headers and for choosing a compute dtype.

Every benchmark names the CPU it ran on (model and its AMX / AVX512 flags): a speed-up seen on one CPU
is not a property of the product until it holds on the others.
"""

from __future__ import annotations

import platform
from pathlib import Path

FEATURES = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def _cpuinfo() -> tuple[str, list[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; ("", []) where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "", []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return model, flags


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing)."""
    return set(_cpuinfo()[1])


def cpu_name() -> str:
    """The CPU model and which of AMX-bf16 / AVX512-bf16 / AVX512F / AVX2 it has, e.g. "AMD EPYC (avx512_bf16, avx512f, avx2)"."""
    model, flags = _cpuinfo()
    model = model or platform.processor() or "unknown CPU"
    feats = [f for f in FEATURES if f in flags]
    if not any(f.startswith(("amx", "avx512")) for f in feats):
        feats.append("no AVX512")  # e.g. "AMD EPYC (avx2, no AVX512)": learn runs in fp32 there
    return f"{model} ({', '.join(feats)})"
