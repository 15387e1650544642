"""momcompress.hardware: the CPU's name and flags, read from /proc/cpuinfo, for benchmark headers."""

from __future__ import annotations

import re

import pytest
import torch

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


class _FakeLoad:
    """A sampler for ThreadGovernor: the system's and our own CPU seconds advance as set per call."""

    def __init__(self):
        self.t = self.busy = self.own = 0.0

    def run(self, seconds, others, ours):
        self.t += seconds
        self.busy += seconds * (others + ours)
        self.own += seconds * ours

    def __call__(self):
        return self.t, self.busy, self.own


def test_thread_governor_gives_way_to_other_programs_and_takes_the_cores_back(monkeypatch):
    from momcompress.hardware import ThreadGovernor

    monkeypatch.delenv(ThreadGovernor.ENV, raising=False)
    before = torch.get_num_threads()
    load = _FakeLoad()
    try:
        torch.set_num_threads(2)
        gov = ThreadGovernor(max_threads=2, interval=3.0, sampler=load)
        gov.cores = gov.system_cores = 2
        assert gov.enabled
        load.run(1.0, others=1.0, ours=1.3)
        assert gov.update() is None and torch.get_num_threads() == 2  # less than `interval`: not yet read
        load.run(3.0, others=0.8, ours=1.3)  # a busy single-threaded program beside us
        assert gov.update() == (2, 1, pytest.approx(0.85, abs=0.01)) and torch.get_num_threads() == 1
        load.run(4.0, others=1.0, ours=1.0)
        assert gov.update() is None and torch.get_num_threads() == 1
        load.run(4.0, others=0.05, ours=1.0)  # it ended: background noise only
        assert gov.update()[:2] == (1, 2) and torch.get_num_threads() == 2
        load.run(0.5, others=1.0, ours=0.0)
        assert gov.update(force=True)[:2] == (2, 1)  # settle() reads a short idle interval at once
        assert gov.threads_for(5.0) == 1 and gov.threads_for(0.0) == 2  # never below 1, never above the start
        monkeypatch.setenv(ThreadGovernor.ENV, "0")
        off = ThreadGovernor(max_threads=2, sampler=load)
        load.run(5.0, others=2.0, ours=0.0)
        assert not off.enabled and off.update() is None and off.settle(0.0) is None
    finally:
        torch.set_num_threads(before)


def test_cpu_sample_reads_this_machine():
    from momcompress.hardware import _cpu_sample

    s = _cpu_sample()
    if s is None:
        pytest.skip("no /proc/stat here")
    t, busy, own = s
    assert t > 0 and busy >= 0 and own >= 0
