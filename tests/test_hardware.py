"""momcompress.hardware: the CPU's name and flags, read from /proc/cpuinfo, for benchmark headers."""

from __future__ import annotations

import re

from momcompress import hardware


def test_cpu_name_names_the_model_and_its_avx512_amx_flags():
    name = hardware.cpu_name()
    assert re.fullmatch(r".+ \((.+)\)", name), name  # "MODEL (flag, flag)", "MODEL (avx2, no AVX512)"
    listed = set(re.fullmatch(r".+ \((.+)\)", name).group(1).split(", "))
    assert listed - {"no AVX512"} <= set(hardware.FEATURES) & hardware.cpu_flags()
    has_512 = any(f.startswith(("amx", "avx512")) for f in hardware.cpu_flags())
    assert ("no AVX512" in listed) == (not has_512)


def test_cpu_flags_is_a_set_and_both_survive_without_cpuinfo(monkeypatch):
    assert isinstance(hardware.cpu_flags(), set)
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: ("", []))
    assert hardware.cpu_flags() == set()
    assert hardware.cpu_name().endswith(" (no AVX512)") and len(hardware.cpu_name()) > len(" (no AVX512)")
