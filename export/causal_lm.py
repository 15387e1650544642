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
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")


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


class OrtCausalLM:
    """An exported model.onnx in an onnxruntime session, with the interface of FlatCacheLM.run."""

    def __init__(self, path: str | Path, provider: str = "CPUExecutionProvider", threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        if provider not in ort.get_available_providers():
            from momcompress.errors import ExportError

            raise ExportError(
                f"onnxruntime has no {provider} here (available: {', '.join(ort.get_available_providers())}); "
                "for CUDAExecutionProvider install onnxruntime-gpu instead of onnxruntime"
            )
        self.session = ort.InferenceSession(str(path), options, providers=[provider])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key_values.")) // 2
        first = inputs["past_key_values.0.key"]
        self._kv = (first.shape[1], first.shape[3])  # static (H_kv, D)
        self._dtype = np.float16 if "float16" in first.type else np.float32
        self.output_names = ["logits", *present_names(self.num_layers)]

    def first_past(self, batch: int) -> list[np.ndarray]:
        heads, head_dim = self._kv
        return [np.zeros((batch, heads, 0, head_dim), dtype=self._dtype) for _ in range(2 * self.num_layers)]

    def run(self, input_ids, attention_mask, position_ids, past) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feeds.update(zip(past_names(self.num_layers), past))
        logits, *present = self.session.run(self.output_names, {k: np.ascontiguousarray(v) for k, v in feeds.items()})
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
