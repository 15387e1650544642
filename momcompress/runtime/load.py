"""`momcompress.load(FROZEN_DIR)`: a transformers causal LM whose FFNs are frozen MoM modules.

The folder is what `momcompress freeze` writes: config.json with a `momcompress` section (experts,
top-k, block size, per-layer block counts), the tokenizer, and model.safetensors (weights and the
per-expert block lists). Loading needs no training state and no network; `generate()` works as usual
(KV cache included). Format 1 folders (block lists in config.json) still load.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from momcompress.errors import ModelLoadError
from momcompress.models import check_supported, decoder_layers
from momcompress.runtime.mom_ffn import FrozenMoMFFN
from momcompress.registry import folder_loader

WEIGHTS_FILE = "model.safetensors"
SUPPORTED_FORMATS = (1, 2)  # 1: block lists in config.json; 2: lists in model.safetensors, counts in config.json


def read_frozen_config(path: Path):
    """The model config of a frozen folder, checked; its `momcompress` section is config.momcompress."""
    from transformers import AutoConfig

    if not path.is_dir():
        raise ModelLoadError(f"frozen model folder {path} does not exist (create it with `momcompress freeze`)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a model folder (create one with `momcompress freeze`)")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not read {path / 'config.json'}: {exc}") from exc
    section = getattr(config, "momcompress", None)
    if not isinstance(section, dict) or "layers" not in section:
        raise ModelLoadError(
            f"{path} is a dense model folder, not a frozen MoM model (config.json has no `momcompress` section): "
            "run `momcompress freeze` on a learn run, or load it with transformers"
        )
    if section.get("format_version") not in SUPPORTED_FORMATS:
        raise ModelLoadError(f"{path} uses frozen format {section.get('format_version')}; this momcompress reads {SUPPORTED_FORMATS}: upgrade momcompress")
    check_supported(config)
    return config


def load(frozen_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a frozen MoM model folder as a transformers causal LM (eval mode, no gradients).

    Args:
        frozen_dir: folder written by `momcompress freeze`.
        device: where to put the model.
        dtype: weight dtype (default: as stored); the routers stay fp32.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = Path(frozen_dir)
    config = read_frozen_config(path)
    section = config.momcompress
    if not (path / WEIGHTS_FILE).is_file():
        raise ModelLoadError(f"{path / WEIGHTS_FILE} is missing: the folder is incomplete; freeze again")
    try:
        state = load_file(path / WEIGHTS_FILE)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path / WEIGHTS_FILE} is corrupt ({exc}); freeze again") from None
    loader = folder_loader(section.get("method"))  # e.g. TEAL: dense FFN weights + per-layer thresholds
    if loader is not None:
        return loader(path, config, state, device, dtype)
    if section.get("selector") == "activations":
        return _load_selector(path, config, state, device, dtype)
    # Build the model with a one-block FFN so no dense FFN weights are allocated, then swap in the MoM layers.
    build_config = copy.deepcopy(config)
    build_config.intermediate_size = section["block_size"]
    del build_config.momcompress
    if hasattr(build_config, "auto_map"):  # the folder's standalone modeling file is for plain transformers, not for us
        del build_config.auto_map
    # The weights' dtype, from a dense matrix (routers and scales are fp32 whatever the model dtype).
    stored = next((t.dtype for k, t in state.items() if k.endswith("shared_gate") or k.endswith("embed_tokens.weight")), torch.float32)
    model = AutoModelForCausalLM.from_config(build_config, dtype=stored)
    model.config.intermediate_size = config.intermediate_size
    model.config.momcompress = section
    layers = decoder_layers(model)
    if len(layers) != len(section["layers"]):
        raise ModelLoadError(f"{path}: config has {len(layers)} layers but the momcompress section lists {len(section['layers'])}")
    for i, (layer, plan) in enumerate(zip(layers, section["layers"])):
        try:
            num_shared, num_routed, sizes = _layer_shapes(plan, state, f"model.layers.{i}.mlp.", section["format_version"])
        except KeyError as exc:
            raise ModelLoadError(f"{path}: layer {i} lacks {exc} (config.json or {WEIGHTS_FILE} is incomplete); freeze again") from None
        layer.mlp = FrozenMoMFFN(
            config.hidden_size,
            section["block_size"],
            section["num_blocks"],
            section["top_k"],
            num_shared,
            num_routed,
            sizes,
            section["activation"],
            dtype=stored,
            routing=section.get("routing", "renormalized"),
        )
    return load_weights(model, state, path, config, device, dtype, remedy="freeze again")


def _load_selector(path: Path, config, state: dict, device, dtype):
    """A causal LM with FrozenSelectFFN layers from a selector folder."""
    from transformers import AutoModelForCausalLM

    from momcompress.runtime.select_ffn import FrozenSelectFFN

    section = config.momcompress
    build_config = copy.deepcopy(config)
    build_config.intermediate_size = 1  # no dense FFN weights allocated; the selector layers replace them
    del build_config.momcompress
    if hasattr(build_config, "auto_map"):
        del build_config.auto_map
    # The model's dtype from the embeddings; the FFN tables may be stored narrower (freeze --table-dtype).
    stored = next((t.dtype for k, t in state.items() if k.endswith("embed_tokens.weight")), torch.float32)
    tables = next((t.dtype for k, t in state.items() if k.endswith("mlp.gate_up")), stored)
    model = AutoModelForCausalLM.from_config(build_config, dtype=stored)
    model.config.intermediate_size = config.intermediate_size
    model.config.momcompress = section
    layers = decoder_layers(model)
    if len(layers) != len(section["layers"]):
        raise ModelLoadError(f"{path}: config has {len(layers)} layers but the momcompress section lists {len(section['layers'])}")
    for i, (layer, plan) in enumerate(zip(layers, section["layers"])):
        try:
            n = int(plan["neurons"])
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{path}: layer {i} of the momcompress section lacks its neuron count; freeze again") from None
        layer.mlp = FrozenSelectFFN(config.hidden_size, config.intermediate_size, n, section["activation"], dtype=tables)
    return load_weights(model, state, path, config, device, dtype, remedy="freeze again")


def _layer_shapes(plan: dict, state: dict, prefix: str, version: int) -> tuple[int, int, list[int]]:
    """(shared blocks, stored routed blocks, list length per expert) of one layer of a frozen folder."""
    if version == 1:  # the lists themselves are in config.json
        num_routed = state[prefix + "routed_gate"].shape[0] if prefix + "routed_gate" in state else len(plan["routed"])
        return len(plan["shared"]), num_routed, [len(e) for e in plan["experts"]]
    return int(plan["shared"]), int(plan["routed_stored"]), state[prefix + "expert_offsets"].diff().tolist()


def load_weights(model, state: dict, path: Path, config, device, dtype, remedy: str):
    """Load `state` into a model built from `config` (tied lm_head may be absent), then cast, move, and
    put it in eval mode without gradients; ModelLoadError (ending in `remedy`) when they do not match."""
    expected = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    missing = set(expected) - set(state) - ({"lm_head.weight"} if tied else set())
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"{path / WEIGHTS_FILE} does not match its config (missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}); {remedy}"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ModelLoadError(f"{path / WEIGHTS_FILE} does not match its config ({exc}); {remedy}") from None
    if tied:
        model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    model.to(device).eval()
    model.requires_grad_(False)
    return model
