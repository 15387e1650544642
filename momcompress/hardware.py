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


class ThreadGovernor:
    """Keeps torch's intra-op thread count at the cores other programs leave free, for long CPU work (`learn`).

    PyTorch's OpenMP threads meet at a barrier after every op; when another program holds one of the cores,
    one of our threads waits for its time slice at each barrier and the whole step stalls. On 2 cores beside one
    busy single-threaded process, a training step of the default model's shape took 5.3x its time alone with 2
    threads, and 1.55x with 1 (Intel Xeon, 2026-12-03). So every `interval` seconds the governor reads how much
    CPU the rest of the system used (/proc/stat, less this process's own time) and sets the thread count to the
    cores left free (at least 1, at most the count at start). `MOMCOMPRESS_ADAPTIVE_THREADS=0` turns it off.

        governor = ThreadGovernor()
        governor.settle()           # a first reading before the work starts
        for step in ...:
            ...
            change = governor.update()  # (old, new, cores others used) when the count changed, else None
    """

    ENV = "MOMCOMPRESS_ADAPTIVE_THREADS"

    def __init__(self, max_threads: int | None = None, interval: float = 3.0, sampler=None):
        import os

        import torch

        self.max_threads = max_threads or torch.get_num_threads()
        self.interval = interval
        self.system_cores = os.cpu_count() or 1
        try:
            self.cores = len(os.sched_getaffinity(0))
        except AttributeError:
            self.cores = self.system_cores
        self._sample = sampler or _cpu_sample
        self.enabled = os.environ.get(self.ENV, "1") != "0" and self.max_threads > 1 and self._sample() is not None
        self.others = 0.0  # cores other programs used over the last interval
        self._last = self._sample() if self.enabled else None

    def threads_for(self, others: float) -> int:
        """The thread count for this much CPU (in cores) used by other programs."""
        free = min(self.cores, self.system_cores - others)
        return max(1, min(self.max_threads, int(free + 0.25)))

    def settle(self, seconds: float = 0.5):
        """Read the load over `seconds` of our own idleness (before the work starts) and apply it."""
        if not self.enabled:
            return None
        import time

        time.sleep(seconds)
        return self.update(force=True)

    def update(self, force: bool = False):
        """Re-read the load if `interval` passed (or force); set the thread count. Returns (old, new, others) when
        the count changed, else None."""
        if not self.enabled:
            return None
        now = self._sample()
        if now is None or (not force and now[0] - self._last[0] < self.interval):
            return None
        wall = now[0] - self._last[0]
        if wall <= 0:
            return None
        self.others = max(0.0, ((now[1] - self._last[1]) - (now[2] - self._last[2])) / wall)
        self._last = now
        import torch

        old, new = torch.get_num_threads(), self.threads_for(self.others)
        if new == old:
            return None
        torch.set_num_threads(new)
        return old, new, self.others


def _cpu_sample():
    """(monotonic seconds, CPU seconds the whole system was busy, CPU seconds of this process), or None where
    /proc/stat cannot be read."""
    import os
    import time

    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 8:
        return None
    ticks = [int(v) for v in fields[1:]]
    busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + (ticks[7] if len(ticks) > 7 else 0)  # user nice system irq softirq steal
    return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()
