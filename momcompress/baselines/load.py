"""Loading baseline folders: `load_teal` builds a model with TealFFN layers from a `teal` or `wina` folder.

`momcompress.load` reads moefication and prune folders as they are (they hold FrozenMoMFFN layers). A
teal or wina folder keeps the dense FFN weights under their usual names plus per-layer thresholds in
the config's `momcompress` section; `momcompress.load` hands it to `load_teal` when the section's
"method" is "teal" or "wina". WINA's per-entry score scales (weight column norms) are not stored: they
are recomputed from the loaded weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from momcompress.errors import ModelLoadError


def load_teal(path: Path, config, state: dict[str, torch.Tensor], device, dtype):
    """A causal LM with TealFFN layers from a teal or wina baseline folder (eval mode, no gradients).

    Args:
        path: the folder (for messages).
        config: its model config, with the `momcompress` section as config.momcompress.
        state: its model.safetensors tensors.
        device: where to put the model.
        dtype: weight dtype (None: as stored).
    """
    from transformers import AutoModelForCausalLM

    from momcompress.baselines import teal
    from momcompress.baselines.teal import SCORES, TealFFN
    from momcompress.models import decoder_layers

    section = config.momcompress
    score = section.get("method")
    if score not in SCORES:
        raise ModelLoadError(f"{path / 'config.json'}: method {score!r} is none of {SCORES}; rebuild the baseline")
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
            raise ModelLoadError(f"{path / 'config.json'}: a {score} layer lacks numeric x_threshold / h_threshold; rebuild the baseline") from None
        layer.mlp = TealFFN.from_mlp(layer.mlp, section["activation"], score)
        layer.mlp.x_threshold.fill_(tx)
        layer.mlp.h_threshold.fill_(th)
    from momcompress.runtime.load import load_weights

    model = load_weights(model, state, path, config, device, dtype, remedy="rebuild the baseline")
    for m in teal.teal_layers(model):  # the scales follow the weights just loaded (and cast)
        m.refresh_scales()
    return model
