"""Loading baseline folders: `load_teal` builds a model with TealFFN layers from a `teal` baseline folder.

`momcompress.load` reads moefication and prune folders as they are (they hold FrozenMoMFFN layers). A
teal folder keeps the dense FFN weights under their usual names plus per-layer thresholds in the
config's `momcompress` section; runtime/load.py hands it to `load_teal` when the section's "method"
is "teal". Until it does, `load_baseline` loads any baseline folder.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from momcompress.errors import ModelLoadError


def load_teal(path: Path, config, state: dict[str, torch.Tensor], device, dtype):
    """A causal LM with TealFFN layers from a teal baseline folder (eval mode, no gradients).

    Args:
        path: the folder (for messages).
        config: its model config, with the `momcompress` section as config.momcompress.
        state: its model.safetensors tensors.
        device: where to put the model.
        dtype: weight dtype (None: as stored).
    """
    from transformers import AutoModelForCausalLM

    from momcompress.baselines.teal import TealFFN
    from momcompress.models import decoder_layers

    section = config.momcompress
    build_config = copy.deepcopy(config)
    del build_config.momcompress
    stored = next((t.dtype for k, t in state.items() if k.endswith("embed_tokens.weight")), torch.float32)
    model = AutoModelForCausalLM.from_config(build_config, dtype=stored)
    model.config.momcompress = section
    layers = decoder_layers(model)
    if len(layers) != len(section["layers"]):
        raise ModelLoadError(f"{path}: config has {len(layers)} layers but the momcompress section lists {len(section['layers'])}")
    for layer, record in zip(layers, section["layers"]):
        try:
            tx, th = float(record["x_threshold"]), float(record["h_threshold"])
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{path / 'config.json'}: a teal layer lacks numeric x_threshold / h_threshold; rebuild the baseline") from None
        layer.mlp = TealFFN.from_mlp(layer.mlp, section["activation"])
        layer.mlp.x_threshold.fill_(tx)
        layer.mlp.h_threshold.fill_(th)
    expected = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    missing = set(expected) - set(state) - ({"lm_head.weight"} if tied else set())
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"{path / 'model.safetensors'} does not match its config (missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}); "
            "rebuild the baseline"
        )
    model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    model.to(device).eval()
    model.requires_grad_(False)
    return model


def load_baseline(folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load any baseline folder (or frozen MoM folder): teal through `load_teal`, the rest through `momcompress.load`."""
    from safetensors.torch import load_file

    from momcompress.runtime.load import WEIGHTS_FILE, load, read_frozen_config

    path = Path(folder)
    config = read_frozen_config(path)
    if config.momcompress.get("method") != "teal":
        return load(path, device=device, dtype=dtype)
    if not (path / WEIGHTS_FILE).is_file():
        raise ModelLoadError(f"{path / WEIGHTS_FILE} is missing: the folder is incomplete; rebuild the baseline")
    try:
        state = load_file(path / WEIGHTS_FILE)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path / WEIGHTS_FILE} is corrupt ({exc}); rebuild the baseline") from None
    return load_teal(path, config, state, device, dtype)
