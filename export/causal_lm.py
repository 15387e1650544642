"""The exported causal LM's interface, in PyTorch and in onnxruntime, with greedy generation on both.

The ONNX model takes and returns flat tensors (the names optimum and onnxruntime-genai use):
    inputs   input_ids (B, S) int64, attention_mask (B, P+S) int64, position_ids (B, S) int64,
             past_key_values.{i}.key / .value (B, H_kv, P, D) for every layer i (P may be 0)
    outputs  logits (B, S, V), present.{i}.key / .value (B, H_kv, P+S, D)
`FlatCacheLM` wraps a transformers model with that interface (it is what torch.onnx traces, and the
PyTorch side of every check); `OrtCausalLM` runs an exported file. Both generate greedily with the
same position ids as transformers' `generate` (left padding: cumulative sum of the mask).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from momcompress.errors import ExportError

INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")
ONNX_FILE = "model.onnx"
EXPORT_MANIFEST = "manifest.json"


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def kv_shape(config) -> tuple[int, int]:
    """(key/value heads, head dim) of a transformers config."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return heads, head_dim


class FlatCacheLM(nn.Module):
    """A causal LM taking past keys/values as flat tensors and returning logits and present keys/values.

    The cache is a DynamicCache of full layers built inside forward: sliding-window layers (Gemma 2/3)
    keep every position and the model's sliding-window mask hides the old ones, which gives the same
    logits as transformers' own cropped cache while keeping one (B, H_kv, P+S, D) shape for all layers.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        # transformers >= 5.2x names the argument `cache` (`past_key_values` is deprecated); older: past_key_values.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **{self._cache_arg: cache}
        )
        present = getattr(out, "cache", None) or out.past_key_values
        flat = []
        for layer in present.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        heads, head_dim = kv_shape(self.model.config)
        dtype = next(self.model.parameters()).dtype
        return [torch.zeros(batch, heads, 0, head_dim, dtype=dtype) for _ in range(2 * self.num_layers)]

    @torch.no_grad()
    def run(self, input_ids, attention_mask, position_ids, past) -> tuple[np.ndarray, list[np.ndarray]]:
        """Numpy in, numpy out: (logits, present) like OrtCausalLM.run."""
        t = [torch.from_numpy(np.ascontiguousarray(a)) for a in (input_ids, attention_mask, position_ids, *past)]
        logits, *present = self(*t)
        return logits.float().numpy(), [p.numpy() for p in present]

    def first_past(self, batch: int) -> list[np.ndarray]:
        return [p.numpy() for p in self.empty_past(batch)]


class OnnxModelError(ExportError):
    """An exported model.onnx is missing, unreadable, or lacks the causal-LM inputs and outputs."""


ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


EXPERTS_MODES = ("auto", "kernel", "body")
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    import logging

    if message not in _warned:
        _warned.add(message)
        logging.getLogger(__name__).warning(message)


class OrtCausalLM:
    """An exported model.onnx in an onnxruntime session, with the interface of FlatCacheLM.run.

    The one onnxruntime runner of the package: export's checks, validate's timings and bench_onnx use it.
    A graph without past_key_values inputs runs too (``has_cache`` is False, ``first_past`` is empty).

    Args:
        path: model.onnx, or the folder holding it (and the exporter's manifest.json, read into .manifest).
        provider: onnxruntime execution provider.
        threads: intra-op threads (None or 0: onnxruntime's default, all cores).
        kv_shape: (key/value heads, head dim) for cache dimensions the graph leaves symbolic (our exports fix
            them; a foreign graph may not).
        spinning: let idle worker threads spin (onnxruntime's default); timings that alternate two sessions
            turn it off so one session's spinning threads do not slow the other.
        experts: how the momcompress nodes (MoMExperts, SelectFFN) run on the CPU provider: "auto" (the compiled momcompress kernel when
            `momcompress build-ops` has built it, else the node's ONNX function body, with a warning),
            "kernel" (the kernel or an OrtOpsError) or "body" (always the function body).

        initializers: values that replace the file's initializers of those names in this session (the export
            checks switch a per-token selector's thresholds off this way); the file is not changed.

    ``experts_path`` says which ran: "kernel", "function body", or None for a graph without momcompress nodes.
    ``custom_op`` names the node it is about: "MoMExperts", or "SelectFFN" (per-token selector).
    ``long_calls`` says what runs a selector layer's calls of more than the file's row_tokens tokens: "amx" (the
    kernel's AMX tile products, bf16 tables on a CPU with AMX-BF16: every call reaches SelectFFN, the session
    running the graph without the switch's If nodes, ``row_switch_removed``, or, for a file over protobuf's 2 GiB
    or with external data, with the switch moved out of the way), "matmul" (the file's MatMul branch), None (no
    selector).
    """

    def __init__(self, path: str | Path, provider: str = "CPUExecutionProvider", threads: int | None = None,
                 kv_shape: tuple[int, int] | None = None, spinning: bool = True, experts: str = "auto",
                 initializers: dict[str, np.ndarray] | None = None):
        path = Path(path)
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
            raise OnnxModelError("running ONNX models needs onnxruntime: `pip install onnxruntime`") from None
        if provider not in ort.get_available_providers():
            raise ExportError(
                f"onnxruntime has no {provider} here (available: {', '.join(ort.get_available_providers())}); "
                "for CUDAExecutionProvider install onnxruntime-gpu instead of onnxruntime"
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.threads = threads or 0  # 0: onnxruntime's default
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.ops_library = None  # the momcompress ops library registered in this session, if any
        self._proto = None  # the file's ModelProto while __init__ may change the graph (set by _custom_nodes)
        self.custom_op = "MoMExperts"  # the momcompress node the graph has per layer (SelectFFN for a per-token selector)
        self.select_bf16_tables = False  # SelectFFN nodes whose tables are bf16 (set by _custom_nodes)
        self.row_switch = False  # the file routes selector calls by token count (select_op.ROW_TOKENS_NAME)
        self.experts_path = self._register_ops(options, provider, experts)
        # bf16 selector tables on a CPU with AMX: SelectFFN's kernel runs every call (rows for few tokens, AMX tile
        # products for more), so the export's switch goes (its If nodes removed, or the switch moved) unless the
        # caller set it
        self.long_calls = None  # "amx" when that is so ("matmul": the file's MatMul branch; None: no selector)
        self.row_switch_removed = False  # the session runs the graph without the switch's If nodes (see below)
        source: str | bytes = str(self.path)
        if self.custom_op == "SelectFFN":
            from momcompress.export import ort_ops, select_op

            self.long_calls = "matmul"
            if (self.experts_path == ort_ops.KERNEL and self.select_bf16_tables and self.row_switch
                    and select_op.ROW_TOKENS_NAME not in (initializers or {}) and ort_ops.amx_usable(self.ops_library)):
                self.long_calls = "amx"
                # The graph without the If nodes (each If is a subgraph call per layer and step, about 4% of a decode
                # step): possible when the file fits one protobuf; else the switch moves out of the way.
                if self._proto is not None and select_op.unroute(self._proto):
                    source = self._proto.SerializeToString()
                    self.row_switch_removed = True
                else:
                    initializers = {**(initializers or {}), select_op.ROW_TOKENS_NAME: np.array(2**62, dtype=np.int64)}
        self._proto = None
        # onnxruntime reads these buffers in place for the session's lifetime: keep them referenced
        self._overrides = [(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))) for name, v in (initializers or {}).items()]
        for name, value in self._overrides:
            options.add_initializer(name, value)
        try:
            self.session = ort.InferenceSession(source, options, providers=[provider])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise OnnxModelError(f"onnxruntime cannot load {self.path}: {e}") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if "input_ids" not in self.inputs or "logits" not in outputs:
            raise OnnxModelError(f"{self.path} has inputs {sorted(self.inputs)} and outputs {sorted(outputs)}; a causal "
                                 "LM export needs input_ids and logits: re-export with `momcompress export`")
        self.num_layers = sum(1 for n in self.inputs if n.startswith("past_key_values.")) // 2
        self.past_names = past_names(self.num_layers)
        missing = [n for n in self.past_names if n not in self.inputs]
        missing += [n for n in present_names(self.num_layers) if n not in outputs]
        if missing:
            raise OnnxModelError(f"{self.path} lacks {missing[0]} (past_key_values.{{i}}.key/value in, present.{{i}}."
                                 "key/value out, for every layer): re-export with `momcompress export`")
        self.output_names = ["logits", *present_names(self.num_layers)]
        self._kv_shape = kv_shape

    def _custom_nodes(self) -> str | None:
        """"kernel" when the graph has nodes the momcompress kernel library implements (MoMExperts,
        SelectedRowsFFN, SelectFFN), "body" for other momcompress nodes (they always run their function
        body), None for a graph without momcompress nodes (dense)."""
        if self.manifest is not None and self.manifest.get("kind") == "dense":
            return None
        import onnx

        from momcompress.export import op, select_op

        model = onnx.load(str(self.path), load_external_data=False)
        external = any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
        # kept for __init__'s graph changes when the whole model is in this one file (under protobuf's 2 GiB)
        self._proto = None if external or self.path.stat().st_size >= 2**31 - 2**24 else model
        nodes = [n for n in select_op.iter_nodes(model.graph) if n.domain == op.DOMAIN]
        types = {n.op_type for n in nodes}
        if select_op.OP_TYPE in types:
            self.custom_op = select_op.OP_TYPE
            inits = {i.name: i.data_type for i in model.graph.initializer}
            tables = [inits.get(n.input[2]) for n in nodes if n.op_type == select_op.OP_TYPE]
            self.select_bf16_tables = bool(tables) and all(t == onnx.TensorProto.BFLOAT16 for t in tables)
            self.row_switch = select_op.ROW_TOKENS_NAME in inits
        if types & {op.OP_TYPE, op.SELECTED_ROWS_OP, select_op.OP_TYPE, select_op.HIDDEN_OP}:
            return "kernel"
        return "body" if types else None

    def _register_ops(self, options, provider: str, experts: str) -> str | None:
        """Register the momcompress ops library as `experts` asks; return the path MoMExperts will take."""
        from momcompress.export import ort_ops

        if experts not in EXPERTS_MODES:
            raise ExportError(f"experts must be one of {', '.join(EXPERTS_MODES)}, got {experts!r}")
        nodes = self._custom_nodes()
        if nodes is None:
            return None
        if nodes == "body" and experts == "kernel":
            raise ExportError(f"{self.path}'s momcompress nodes have no compiled kernel and run their function body; "
                              "pass experts='auto' or 'body'")
        if experts == "body" or nodes == "body":
            return ort_ops.FUNCTION_BODY
        if provider != "CPUExecutionProvider":  # the library has CPU kernels only; other providers run the body
            if experts == "kernel":
                raise ExportError(f"the momcompress kernel runs on CPUExecutionProvider only, not {provider}")
            return ort_ops.FUNCTION_BODY
        self.ops_library = ort_ops.register(options, required=experts == "kernel")
        if self.ops_library is None:
            _warn_once(ort_ops.missing_message())
            return ort_ops.FUNCTION_BODY
        return ort_ops.KERNEL

    @property
    def has_cache(self) -> bool:
        """Whether the graph takes and returns a KV cache."""
        return self.num_layers > 0

    def _empty_past(self, name: str, batch: int) -> np.ndarray:
        spec = self.inputs[name]
        static_past = len(spec.shape) == 4 and isinstance(spec.shape[2], int) and spec.shape[2] != 0
        if len(spec.shape) != 4 or static_past:
            raise OnnxModelError(f"{self.path}: {name} has shape {spec.shape}, expected (batch, kv heads, past, head "
                                 "dim); re-export with `momcompress export`")
        fallback = self._kv_shape or (None, None)
        heads = spec.shape[1] if isinstance(spec.shape[1], int) else fallback[0]
        head_dim = spec.shape[3] if isinstance(spec.shape[3], int) else fallback[1]
        if heads is None or head_dim is None:
            raise OnnxModelError(f"{self.path}: {name} leaves its kv heads or head dim symbolic ({spec.shape}): pass "
                                 "kv_shape=(heads, head_dim)")
        return np.zeros((batch, heads, 0, head_dim), dtype=ORT_DTYPES.get(spec.type, np.float32))

    def first_past(self, batch: int) -> list[np.ndarray]:
        """An empty cache for `batch` sequences: 2 x layers arrays of (B, H_kv, 0, D); [] without a cache."""
        return [self._empty_past(name, batch) for name in self.past_names]

    def run(self, input_ids, attention_mask, position_ids, past) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits (B, S, V) float32, present key/values) for input_ids (B, S) after the cache `past`."""
        values = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  **dict(zip(self.past_names, past))}
        feeds = {}
        for name, spec in self.inputs.items():
            if name not in values:
                raise OnnxModelError(f"{self.path} needs input {name!r}, which a causal LM run does not provide; "
                                     "re-export with `momcompress export`")
            feeds[name] = np.ascontiguousarray(values[name], dtype=ORT_DTYPES.get(spec.type))
        logits, *present = self.session.run(self.output_names, feeds)
        return logits.astype(np.float32), present


def prefill_positions(attention_mask: np.ndarray) -> np.ndarray:
    """Position ids of a left-padded prompt, as transformers' generate makes them: (B, S) int64."""
    pos = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, pos).astype(np.int64)


def greedy_generate(lm, input_ids: np.ndarray, attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy decoding with the KV cache through lm.run (FlatCacheLM or OrtCausalLM): (B, S + new_tokens)."""
    ids, mask = input_ids.astype(np.int64), attention_mask.astype(np.int64)
    logits, past = lm.run(ids, mask, prefill_positions(mask), lm.first_past(ids.shape[0]))
    out = [ids]
    pos = prefill_positions(mask)[:, -1:]
    for step in range(new_tokens):
        nxt = logits[:, -1].argmax(-1).astype(np.int64)[:, None]  # (B, 1)
        out.append(nxt)
        if step == new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        pos = pos + 1
        logits, past = lm.run(nxt, mask, pos, past)
    return np.concatenate(out, axis=1)
