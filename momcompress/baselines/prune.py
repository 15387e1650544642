"""Static structured pruning baseline: the learn machinery with one expert and no router, then freeze.

With E = 1 and top-1 every token uses the same block mask, so `learn` (hard-concrete gates, ratio
control, distillation: the same budget and options as a MoM run) learns which FFN blocks to keep for
everyone, and `freeze` turns the gates into shared (kept) and pruned blocks: a plain smaller dense FFN
per layer. Runs learn and freeze in a temporary folder next to OUTPUT, then writes OUTPUT with the
frozen model, its config section marked "method": "prune" and a baseline manifest.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from momcompress import __version__
from momcompress.errors import ConfigError
from momcompress.fsutil import atomic_dir_write

# LearnConfig fields the prune baseline sets itself.
FIXED = ("selector", "experts", "top_k", "target")


def learn_config(config):
    """The LearnConfig of the pruning run: one expert, top-1, the baseline's target, data and budget."""
    from momcompress.config import LearnConfig

    fixed = sorted(set(config.learn_options) & set(FIXED))
    if fixed:
        raise ConfigError(f"the prune baseline sets {fixed} itself (one expert, top-1, --target): drop them from the learn options")
    options = {
        **config.learn_options,
        "target": config.target,
        "selector": "experts",
        "experts": 1,
        "top_k": 1,
        "seq_len": config.seq_len,
        "eval_tokens": config.eval_tokens,
        "seed": config.seed,
        "device": config.device,
        "dtype": config.dtype,
        "data": config.data,
        "text_field": config.text_field,
        "block_size": config.block_size,
    }
    if config.steps is not None:
        options["steps"] = config.steps
    if config.tokens is not None:  # as `learn --tokens`: a token budget becomes whole steps
        probe = LearnConfig.from_dict({**options, "steps": 1})
        options["steps"] = max(1, config.tokens // probe.tokens_per_step)
    return LearnConfig.from_dict(options)


def prune(model, out: Path, config) -> dict:
    """Learn one block mask per layer for MODEL, freeze it and write the baseline folder OUT; return its manifest."""
    from momcompress.calibration.data import describe_data
    from momcompress.ratio_rule import RATIO_TOLERANCE
    from momcompress.freeze.freezer import freeze
    from momcompress.learn.trainer import learn
    from momcompress.modelio import MANIFEST_FILE, library_versions

    t_start = time.time()
    cfg = learn_config(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.prune-", dir=out.parent))
    try:
        learned = learn(model, work / "run", cfg)
        frozen_dir = work / "frozen"
        fm = freeze(work / "run", frozen_dir, tolerance=RATIO_TOLERANCE, device=config.device, batch_size=config.batch_size)
        model_config = json.loads((frozen_dir / "config.json").read_text())
        model_config["momcompress"]["method"] = "prune"
        fp = fm["parameters"]
        manifest = {
            "stage": "baseline",
            "method": "prune",
            "momcompress_version": __version__,
            "versions": library_versions(),
            "config": config.to_dict(),
            "learn_config": cfg.to_dict(),
            "source_model": fm["source_model"],
            "source_model_hash": fm["source_model_hash"],
            "architecture": fm["architecture"],
            "num_layers": fm["num_layers"],
            "target": config.target,
            "fit_ratio": fm["fit_ratio"],
            "measured_ratio": fm["measured_ratio"],
            "measured_ratio_per_layer": fm["measured_ratio_per_layer"],
            "ratio_rule": fm["ratio_rule"],
            "ratio_note": fm["ratio_note"],  # freeze applies momcompress.ratio_rule, as every method does
            "heldout_tokens": fm["heldout_tokens"],
            "calibration": {
                "tokens": learned["train_tokens_seen"],
                "wall_seconds": learned["wall_seconds"],
                "steps": learned["steps"],
                **describe_data(config.data),
            },
            "parameters": {
                "dense_total": fp["dense_total"],
                "baseline_total": fp["frozen_total"],
                "dense_ffn": fp["dense_ffn"],
                "baseline_ffn_stored": fp["frozen_ffn_stored"],
                "ffn_active_per_token": fp["ffn_active_per_token"],
                "dense_ffn_active_per_token": fp["dense_ffn_active_per_token"],
                "model_active_per_token": fp["model_active_per_token"],
                "dense_model_active_per_token": fp["dense_model_active_per_token"],
            },
            "perplexity": {"dense": fm["perplexity"]["dense"], "baseline": fm["perplexity"]["frozen"], "tokens": fm["perplexity"]["tokens"]},
            "details": {
                "block_size": fm["block_size"],
                "num_blocks": fm["num_blocks"],
                "threshold": fm["threshold"],
                "learn_metrics": learned["metrics"],
                "checks": fm["checks"],
            },
            "blocks": fm["blocks"],
            "disk_bytes": {"dense": fm["disk_bytes"]["dense"], "baseline": fm["disk_bytes"]["frozen"]},
        }

        def write(folder: Path) -> None:
            for item in frozen_dir.iterdir():
                if item.name in ("config.json", MANIFEST_FILE):
                    continue
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, folder / item.name)
            (folder / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
            manifest["wall_seconds"] = time.time() - t_start
            (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))

        atomic_dir_write(out, write)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest
