"""Latency of the dense and the MoM model, side by side in one run: PyTorch and onnxruntime.

Two phases, each timed on the same real tokens for both models:
- prefill: one forward pass over a P-token prompt that fills the KV cache (time to first token);
- decode: D single-token steps that extend the cache (per-token latency), fed the next real tokens
  (teacher forcing) so both models do the same work whatever they would have generated.

What keeps the numbers stable on a shared CPU:
- threads are pinned: both models run with the same fixed intra-op thread count (torch and onnxruntime),
  and onnxruntime's idle threads do not spin, so one session's workers cannot slow the other's rounds;
- `warmup` untimed rounds first (allocations, lazy init, caches);
- rounds are interleaved (dense then sparse, the next round sparse then dense), so drift in machine load
  hits both models alike, and each round gives one paired ratio sparse / dense;
- every figure is the median over rounds with its min-max spread; when the ratio's spread is wider than
  its distance from 1 (the difference it reports), the result carries a warning: the run cannot tell
  whether the sparse model is faster or slower.

The onnxruntime runner is :class:`momcompress.export.causal_lm.OrtCausalLM` (one class for export's
checks, these timings and the benchmarks).

Example::

    result = time_torch({"dense": dense, "sparse": mom}, tokens, prefill=128, decode=16, repeats=5)
    print(result["decode"]["ratio"], result["decode"]["ratio_range"])  # median and [min, max] sparse / dense
"""

from __future__ import annotations

import contextlib
import inspect
import math
import statistics
import time

import numpy as np
import torch

from momcompress.export.causal_lm import OnnxModelError, OrtCausalLM  # noqa: F401  (OnnxModelError: re-export)

PHASES = ("prefill", "decode")
DEFAULT_WARMUP = 1


# ----------------------------------------------------------------------------- shared timing loop


def summarise_rounds(dense: list[float], sparse: list[float]) -> dict:
    """Median and min-max of paired per-round timings (seconds) and of their ratios sparse / dense.

    Args:
        dense, sparse: one time per timed round each, in the same round order (round i of both paired).

    Returns:
        {"dense_ms", "sparse_ms": medians; "dense_ms_range", "sparse_ms_range": [min, max];
        "ratio": median of the per-round ratios; "ratio_range": [min, max] of them; "rounds";
        "unstable": whether the ratio's spread (max - min) is wider than |ratio - 1|}. A phase that was not
        run (all dense times 0) gives NaN ratios and is never unstable.
    """
    if len(dense) != len(sparse) or not dense:
        raise ValueError(f"need the same positive number of dense and sparse rounds, got {len(dense)} and {len(sparse)}")
    ratios = [s / d if d > 0 else math.nan for d, s in zip(dense, sparse)]
    finite = [r for r in ratios if math.isfinite(r)]
    ratio = statistics.median(finite) if finite else math.nan
    ratio_range = [min(finite), max(finite)] if finite else [math.nan, math.nan]
    return {
        "dense_ms": 1000 * statistics.median(dense), "sparse_ms": 1000 * statistics.median(sparse),
        "dense_ms_range": [1000 * min(dense), 1000 * max(dense)],
        "sparse_ms_range": [1000 * min(sparse), 1000 * max(sparse)],
        "ratio": ratio, "ratio_range": ratio_range, "rounds": len(dense),
        "unstable": bool(finite) and (ratio_range[1] - ratio_range[0]) > abs(ratio - 1),
    }


def spread_warning(label: str, phase: str, summary: dict) -> str | None:
    """The warning for an unstable phase summary (see summarise_rounds), else None."""
    if not summary["unstable"]:
        return None
    lo, hi = summary["ratio_range"]
    return (f"{label} {phase}: sparse / dense ranged {lo:.2f}-{hi:.2f} over {summary['rounds']} rounds, wider than "
            f"the difference it reports (median {summary['ratio']:.2f} vs 1.00): the machine was too noisy to tell "
            "which model is faster; close other programs or raise --repeats")


def _interleave(runners: dict, tokens: torch.Tensor, prefill: int, decode: int, repeats: int, progress,
                warmup: int = DEFAULT_WARMUP) -> dict:
    """Time every runner's (prefill, decode) `warmup` + `repeats` times, alternating the order each round.

    Args:
        runners: {"dense": fn, "sparse": fn}, each fn(tokens, prefill, decode) -> (prefill s, total decode s).

    Returns:
        {"prefill": summary, "decode": summary} (summarise_rounds; decode per token), "warmup".
    """
    names = tuple(runners)
    if len(names) != 2:
        raise ValueError("time two models: dense and sparse")
    times = {name: {phase: [] for phase in PHASES} for name in names}
    for rnd in range(warmup + repeats):  # the first `warmup` rounds are dropped
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            t_prefill, t_decode = runners[name](tokens, prefill, decode)
            if rnd >= warmup:
                times[name]["prefill"].append(t_prefill)
                times[name]["decode"].append(t_decode / decode)
        if progress is not None:
            progress.update(1)
    out = {phase: summarise_rounds(times[names[0]][phase], times[names[1]][phase]) for phase in PHASES}
    return {**out, "warmup": warmup}


def _warnings(result: dict, label: str) -> list[str]:
    return [w for phase in PHASES if phase in result if (w := spread_warning(label, phase, result[phase]))]


@contextlib.contextmanager
def pinned_torch_threads(threads: int):
    """Run PyTorch's intra-op pool with exactly `threads` threads inside the block, then restore it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- PyTorch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_arg(model) -> str:
    """The forward() argument that takes the KV cache: `cache` (transformers >= 5.2x) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def _torch_run(model, tokens: torch.Tensor, prefill: int, decode: int) -> tuple[float, float]:
    """(prefill seconds, total decode seconds) for one prompt of `prefill` tokens and `decode` steps."""
    device = next(model.parameters()).device
    ids = tokens.to(device).view(1, -1)  # (1, P + D)
    arg = _cache_arg(model)
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids[:, :prefill], use_cache=True)
    _sync(device)
    t1 = time.perf_counter()
    cache = _cache_of(out)
    for t in range(prefill, prefill + decode):
        out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{arg: cache})
        cache = _cache_of(out)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


def time_torch(models: dict, tokens: torch.Tensor, prefill: int = 128, decode: int = 16, repeats: int = 5,
               progress=None, threads: int | None = None, warmup: int = DEFAULT_WARMUP, label: str = "torch") -> dict:
    """Median prefill and per-token decode latency of two PyTorch causal LMs, interleaved, with spreads.

    Args:
        models: {"dense": model, "sparse": model}, on the device to time (the order is the ratio's).
        tokens: (prefill + decode,) token ids of real text.
        prefill: prompt length in tokens.
        decode: decode steps after the prompt.
        repeats: timed rounds (after `warmup` untimed ones).
        progress: an optional tqdm bar advanced once per round (warm-up rounds included).
        threads: intra-op threads for both models (None: torch's current count), pinned while timing.
        warmup: untimed rounds first.
        label: names the runtime in warnings.

    Returns:
        {"prefill": summary, "decode": summary (ms per token)} (see summarise_rounds), "prefill_tokens",
        "decode_tokens", "repeats", "warmup", "threads", "warnings" (one line per unstable phase).
    """
    _check_lengths(tokens, prefill, decode, repeats, warmup)
    threads = threads or torch.get_num_threads()
    runners = {name: (lambda m: lambda *a: _torch_run(m, *a))(model) for name, model in models.items()}
    with pinned_torch_threads(threads):
        result = _interleave(runners, tokens, prefill, decode, repeats, progress, warmup)
    out = {**result, "prefill_tokens": prefill, "decode_tokens": decode, "repeats": repeats, "threads": threads}
    out["warnings"] = _warnings(out, label)
    return out


def _check_lengths(tokens: torch.Tensor, prefill: int, decode: int, repeats: int, warmup: int = 0) -> None:
    if prefill < 1 or decode < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"prefill, decode and repeats must be positive and warmup >= 0, got {prefill}, {decode}, "
                         f"{repeats}, {warmup}")
    if tokens.numel() < prefill + decode:
        raise ValueError(f"need {prefill + decode} tokens for timing, got {tokens.numel()}")


# ----------------------------------------------------------------------------- onnxruntime


def open_onnx(folder, threads: int | None = None, kv_shape: tuple[int, int] | None = None) -> OrtCausalLM:
    """An export folder (or model.onnx) opened for timing: CPU, `threads` intra-op threads, no spinning."""
    return OrtCausalLM(folder, threads=threads or torch.get_num_threads(), kv_shape=kv_shape, spinning=False)


def _ort_run(lm: OrtCausalLM, tokens: torch.Tensor, prefill: int, decode: int) -> tuple[float, float]:
    """(prefill seconds, total decode seconds); decode is 0 for a graph without a cache."""
    ids = tokens.view(1, -1).numpy().astype(np.int64)  # (1, P + D)
    positions = np.arange(ids.shape[1], dtype=np.int64)[None]
    t0 = time.perf_counter()
    _, past = lm.run(ids[:, :prefill], np.ones((1, prefill), np.int64), positions[:, :prefill], lm.first_past(1))
    t1 = time.perf_counter()
    if not lm.has_cache:
        return t1 - t0, 0.0
    for t in range(prefill, prefill + decode):
        _, past = lm.run(ids[:, t : t + 1], np.ones((1, t + 1), np.int64), positions[:, t : t + 1], past)
    return t1 - t0, time.perf_counter() - t1


def time_onnx(models: dict[str, OrtCausalLM], tokens: torch.Tensor, prefill: int = 128, decode: int = 16,
              repeats: int = 5, progress=None, warmup: int = DEFAULT_WARMUP, label: str = "onnxruntime") -> dict:
    """As ``time_torch``, for two ``OrtCausalLM``s (open them with ``open_onnx`` to pin their threads);
    decode is left out (with a note) unless both have a cache."""
    _check_lengths(tokens, prefill, decode, repeats, warmup)
    runners = {n: (lambda m: lambda *a: _ort_run(m, *a))(m) for n, m in models.items()}
    result = _interleave(runners, tokens, prefill, decode, repeats, progress, warmup)
    out = {**result, "prefill_tokens": prefill, "decode_tokens": decode, "repeats": repeats}
    threads = {m.threads for m in models.values()}
    out["threads"] = threads.pop() if len(threads) == 1 else sorted(threads)
    no_cache = [name for name, m in models.items() if not m.has_cache]
    if no_cache:
        del out["decode"]
        out["note"] = f"decode not timed: the {' and '.join(no_cache)} export has no past_key_values inputs"
    out["warnings"] = _warnings(out, label)
    return out


def onnx_logits_diff(ort_model: OrtCausalLM, torch_model, tokens: torch.Tensor) -> float:
    """Largest |logit| difference between the ONNX model and its PyTorch counterpart on one prompt."""
    ids = tokens.view(1, -1).numpy().astype(np.int64)
    T = ids.shape[1]
    ort_logits, _ = ort_model.run(ids, np.ones((1, T), np.int64), np.arange(T, dtype=np.int64)[None], ort_model.first_past(1))
    device = next(torch_model.parameters()).device
    with torch.no_grad():
        ref = torch_model(input_ids=torch.from_numpy(ids).to(device), use_cache=False).logits.float().cpu().numpy()
    return float(np.abs(ort_logits - ref).max())
