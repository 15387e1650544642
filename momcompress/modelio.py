"""Model folders on disk, shared by every stage that writes one (freeze, the baselines): the file names,
the library versions a manifest records, the FFN activation of a model, and the folder writer.

    write_model_folder(out, model, tokenizer, section, source_dir, manifest, "frozen", t_start)
    manifest["versions"] = library_versions()
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from momcompress.errors import ModelLoadError
from momcompress.fsutil import atomic_dir_write
from momcompress.models import WEIGHT_SUFFIXES, make_config_portable, save_tokenizer
from momcompress.runtime.mom_ffn import ACTIVATIONS

FORMAT_VERSION = 2  # 2: per-expert lists in model.safetensors, counts in config.json (1: lists in config.json)
WEIGHTS_FILE = "model.safetensors"
BLOCKS_FILE = "blocks.safetensors"  # original FFN block id of every shared / routed / pruned block, per layer
MODELING_FILE = "modeling_momcompress.py"  # copy of momcompress/runtime/hf_modeling.py (plain transformers loading)
MANIFEST_FILE = "manifest.json"


def library_versions() -> dict:
    """Versions of the libraries a stage's numbers depend on, for its manifest."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}


def detect_activation(act_fn: torch.nn.Module) -> str:
    """Name (in momcompress.runtime.mom_ffn.ACTIVATIONS) of the function act_fn computes, by probing it."""
    probe = torch.linspace(-6, 6, 241, dtype=torch.float64)
    out = act_fn(probe)
    for name, fn in ACTIVATIONS.items():
        if torch.allclose(out, fn(probe), rtol=0, atol=1e-6):
            return name
    raise ModelLoadError(f"FFN activation {type(act_fn).__name__} is none of {sorted(ACTIVATIONS)}: cannot freeze it")


def write_model_folder(out: Path, model, tokenizer, section: dict, model_dir: Path, manifest: dict, kind: str,
                       t_start: float, plans: list | None = None) -> None:
    """Write OUT atomically: config.json (+ the `momcompress` section), generation config, tokenizer,
    model.safetensors and manifest.json (with on-disk sizes, dense vs `kind`, and the wall time).

    With plans (freeze's LayerPlans: a MoM-format folder): also blocks.safetensors (each layer's original
    block ids) and the standalone modeling file with config.json's `auto_map`, so that plain transformers
    loads OUT with `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`.
    """
    from momcompress.runtime import hf_modeling

    source_bytes = sum(p.stat().st_size for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES)

    def write(folder: Path) -> None:
        model.config.momcompress = section
        if plans is not None:
            class_name = hf_modeling.model_class_name(model.config.model_type)
            model.config.auto_map = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{class_name}"}
            shutil.copy(hf_modeling.__file__, folder / MODELING_FILE)
            ids = {name: t for i, p in enumerate(plans) for name, t in p.block_ids(f"layers.{i}.").items()}
            save_file({k: v.to(torch.int64).clone() for k, v in ids.items()}, folder / BLOCKS_FILE)  # clone: plans may share tensors
        model.config.save_pretrained(folder)
        make_config_portable(folder)  # RoPE settings transformers 4 reads too
        if (model_dir / "generation_config.json").is_file():
            shutil.copy(model_dir / "generation_config.json", folder / "generation_config.json")
        save_tokenizer(tokenizer, folder)  # loads in transformers 4 and 5
        save_file(state_dict_for_disk(model), folder / WEIGHTS_FILE,
                  metadata={"format": "pt", "momcompress_format": str(FORMAT_VERSION)})
        manifest["disk_bytes"] = {"dense": source_bytes, kind: (folder / WEIGHTS_FILE).stat().st_size}
        manifest["wall_seconds"] = time.time() - t_start
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))

    try:
        atomic_dir_write(out, write)
    finally:
        for attr in ("momcompress", "auto_map"):
            if hasattr(model.config, attr):
                delattr(model.config, attr)


def state_dict_for_disk(model) -> dict[str, torch.Tensor]:
    """The model's tensors, contiguous, with tied weights stored once (the embedding)."""
    seen: set[tuple] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors
