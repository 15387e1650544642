"""Latency of the dense and the MoM model, side by side in one run: PyTorch and onnxruntime.

Two phases, each timed on the same real tokens for both models:
- prefill: one forward pass over a P-token prompt that fills the KV cache (time to first token);
- decode: D single-token steps that extend the cache (per-token latency), fed the next real tokens
  (teacher forcing) so both models do the same work whatever they would have generated.

Measurements are interleaved (repeat r times: dense then sparse, the next round sparse then dense) after
one untimed warm-up round, so drift in machine load (other processes, thermal state) hits both models
alike; each figure is the median over rounds and the comparison is the ratio sparse / dense.

``OrtCausalLM`` runs a ``model.onnx`` with the usual causal-LM signature (inputs ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value``; outputs ``logits`` and
``present.{i}.key/value``), whatever exported it.

Example::

    result = time_torch({"dense": dense, "sparse": mom}, tokens, prefill=128, decode=16, repeats=5)
    print(result["decode"]["ratio"])  # sparse ms / dense ms per decoded token
"""

from __future__ import annotations

import inspect
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from momcompress.errors import MomcompressError

ONNX_FILE = "model.onnx"
EXPORT_MANIFEST = "manifest.json"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


class OnnxModelError(MomcompressError):
    """An exported model.onnx is missing, unreadable, or lacks the causal-LM inputs and outputs."""


# ----------------------------------------------------------------------------- shared timing loop


def _summarise(times: dict[str, dict[str, list[float]]], names: tuple[str, str]) -> dict:
    """Median milliseconds per phase and model, and the ratio second / first (sparse / dense)."""
    out = {}
    for phase in ("prefill", "decode"):
        med = {name: 1000 * statistics.median(times[name][phase]) for name in names}
        ratio = med[names[1]] / med[names[0]] if med[names[0]] > 0 else math.nan  # 0: phase not run
        out[phase] = {**{f"{name}_ms": med[name] for name in names}, "ratio": ratio}
    return out


def _interleave(runners: dict, tokens: torch.Tensor, prefill: int, decode: int, repeats: int, progress) -> dict:
    """Run every runner's (prefill, decode) timing `repeats` times, alternating the order each round."""
    names = tuple(runners)
    if len(names) != 2:
        raise ValueError("time two models: dense and sparse")
    times = {name: {"prefill": [], "decode": []} for name in names}
    for rnd in range(repeats + 1):  # round 0 warms up (allocations, lazy init, caches) and is dropped
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            t_prefill, t_decode = runners[name](tokens, prefill, decode)
            if rnd:
                times[name]["prefill"].append(t_prefill)
                times[name]["decode"].append(t_decode / decode)
        if progress is not None:
            progress.update(1)
    return _summarise(times, names)


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
               progress=None) -> dict:
    """Median prefill and per-token decode latency of two PyTorch causal LMs, interleaved.

    Args:
        models: {"dense": model, "sparse": model}, on the device to time (the order is the ratio's).
        tokens: (prefill + decode,) token ids of real text.
        prefill: prompt length in tokens.
        decode: decode steps after the prompt.
        repeats: timed rounds (after one warm-up round).
        progress: an optional tqdm bar advanced once per round.

    Returns:
        {"prefill": {"dense_ms", "sparse_ms", "ratio"}, "decode": {... ms per token ...}, "prefill_tokens",
        "decode_tokens", "repeats"}.
    """
    _check_lengths(tokens, prefill, decode, repeats)
    runners = {name: (lambda m: lambda *a: _torch_run(m, *a))(model) for name, model in models.items()}
    result = _interleave(runners, tokens, prefill, decode, repeats, progress)
    return {**result, "prefill_tokens": prefill, "decode_tokens": decode, "repeats": repeats}


def _check_lengths(tokens: torch.Tensor, prefill: int, decode: int, repeats: int) -> None:
    if prefill < 1 or decode < 1 or repeats < 1:
        raise ValueError(f"prefill, decode and repeats must be positive, got {prefill}, {decode}, {repeats}")
    if tokens.numel() < prefill + decode:
        raise ValueError(f"need {prefill + decode} tokens for timing, got {tokens.numel()}")


# ----------------------------------------------------------------------------- onnxruntime


class OrtCausalLM:
    """An exported causal LM run with onnxruntime (CPU), with a KV cache when the graph has one.

    Args:
        folder: a folder holding model.onnx (and the exporter's manifest.json, if it wrote one), or the
            model.onnx file itself.
        num_kv_heads, head_dim: sizes of an empty cache entry, (1, num_kv_heads, 0, head_dim), used for
            the dimensions the graph leaves symbolic.
        threads: intra-op threads (0: onnxruntime's default, all cores).
    """

    def __init__(self, folder: str | Path, num_kv_heads: int, head_dim: int, threads: int = 0):
        path = Path(folder)
        self.path = path / ONNX_FILE if path.is_dir() else path
        if not self.path.is_file():
            raise OnnxModelError(f"{path} holds no {ONNX_FILE}: pass the folder written by `momcompress export`")
        manifest = self.path.parent / EXPORT_MANIFEST
        try:
            self.manifest = json.loads(manifest.read_text()) if manifest.is_file() else None
        except (OSError, json.JSONDecodeError) as e:
            raise OnnxModelError(f"{manifest} is not readable JSON ({e}); export again") from None
        try:
            import onnxruntime as ort
        except ImportError:
            raise OnnxModelError("timing ONNX models needs onnxruntime: `pip install onnxruntime`") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise OnnxModelError(f"onnxruntime cannot load {self.path}: {e}") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if "input_ids" not in self.inputs or "logits" not in outputs:
            raise OnnxModelError(f"{self.path} has inputs {sorted(self.inputs)} and outputs {outputs}; a causal LM "
                                 "export needs input_ids and logits: re-export with `momcompress export`")
        self.past_names = sorted(n for n in self.inputs if n.startswith(PAST_PREFIX))
        present = {PAST_PREFIX + n[len(PRESENT_PREFIX):]: n for n in outputs if n.startswith(PRESENT_PREFIX)}
        missing = [n for n in self.past_names if n not in present]
        if missing:
            raise OnnxModelError(f"{self.path} takes {missing[0]} but returns no matching present.* output; "
                                 "re-export with `momcompress export`")
        self.present_of = present  # past input name -> present output name
        self.output_names = ["logits"] + [present[n] for n in self.past_names]
        self.kv_shape = (num_kv_heads, head_dim)

    @property
    def has_cache(self) -> bool:
        """Whether the graph takes and returns a KV cache (decode is timed only then)."""
        return bool(self.past_names)

    def _empty_past(self, name: str) -> np.ndarray:
        spec = self.inputs[name]
        want = (1, self.kv_shape[0], 0, self.kv_shape[1])  # (B, Hkv, past, h)
        shape = [dim if isinstance(dim, int) else want[i] for i, dim in enumerate(spec.shape)]
        if len(shape) != 4 or (isinstance(spec.shape[2], int) and spec.shape[2] != 0):
            raise OnnxModelError(f"{self.path}: {name} has shape {spec.shape}, expected (batch, kv heads, past, head "
                                 "dim); re-export with `momcompress export`")
        return np.zeros(shape, dtype=ORT_DTYPES.get(spec.type, np.float32))

    def _feed(self, ids: np.ndarray, past: dict[str, np.ndarray], past_len: int) -> dict:
        T = ids.shape[1]
        values = {
            "input_ids": ids,
            "attention_mask": np.ones((1, past_len + T), dtype=np.int64),
            "position_ids": np.arange(past_len, past_len + T, dtype=np.int64)[None],
        }
        feed = {}
        for name, spec in self.inputs.items():
            if name in values:
                feed[name] = values[name].astype(ORT_DTYPES.get(spec.type, np.int64), copy=False)
            elif name in past:
                feed[name] = past[name]
            else:
                raise OnnxModelError(f"{self.path} needs input {name!r}, which a causal LM run does not provide; "
                                     "re-export with `momcompress export`")
        return feed

    def forward(self, ids: np.ndarray, past: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
        """(logits (1, T, V), new cache) for ids (1, T) after the cache `past` (None: an empty one)."""
        if past is None:
            past = {n: self._empty_past(n) for n in self.past_names}
        past_len = next(iter(past.values())).shape[2] if past else 0
        outs = self.session.run(self.output_names, self._feed(ids, past, past_len))
        return outs[0], dict(zip(self.past_names, outs[1:]))

    def run_timed(self, tokens: torch.Tensor, prefill: int, decode: int) -> tuple[float, float]:
        """(prefill seconds, total decode seconds); decode is 0 for a graph without a cache."""
        ids = tokens.view(1, -1).numpy().astype(np.int64)
        t0 = time.perf_counter()
        _, past = self.forward(ids[:, :prefill])
        t1 = time.perf_counter()
        if not self.has_cache:
            return t1 - t0, 0.0
        for t in range(prefill, prefill + decode):
            _, past = self.forward(ids[:, t : t + 1], past)
        return t1 - t0, time.perf_counter() - t1


def time_onnx(models: dict[str, OrtCausalLM], tokens: torch.Tensor, prefill: int = 128, decode: int = 16,
              repeats: int = 5, progress=None) -> dict:
    """As ``time_torch``, for two ``OrtCausalLM``s; decode is left out (with a note) unless both have a cache."""
    _check_lengths(tokens, prefill, decode, repeats)
    result = _interleave({n: m.run_timed for n, m in models.items()}, tokens, prefill, decode, repeats, progress)
    out = {**result, "prefill_tokens": prefill, "decode_tokens": decode, "repeats": repeats}
    no_cache = [name for name, m in models.items() if not m.has_cache]
    if no_cache:
        del out["decode"]
        out["note"] = f"decode not timed: the {' and '.join(no_cache)} export has no past_key_values inputs"
    return out


def onnx_logits_diff(ort_model: OrtCausalLM, torch_model, tokens: torch.Tensor) -> float:
    """Largest |logit| difference between the ONNX model and its PyTorch counterpart on one prompt."""
    ids = tokens.view(1, -1)
    ort_logits, _ = ort_model.forward(ids.numpy().astype(np.int64))
    device = next(torch_model.parameters()).device
    with torch.no_grad():
        ref = torch_model(input_ids=ids.to(device), use_cache=False).logits.float().cpu().numpy()
    return float(np.abs(ort_logits.astype(np.float32) - ref).max())
