"""`baseline`: build a comparison model at the same activation ratio as a MoM model (DESIGN.md, "Validation").

Orchestration only; the methods' math is in moefication.py, prune.py and teal.py. Run it with
`momcompress baseline METHOD MODEL --target 0.5 -o DIR`. Methods:
- moefication: balanced co-activation clustering of neurons into E experts + a trained linear router;
- prune: the learn machinery with one expert and no router, frozen (static structured block pruning);
- teal: training-free magnitude thresholding of the FFN projections' inputs;
- wina: the same with each input entry scored by |x_j| times the norm of the weight column it multiplies.

DIR is a frozen model folder like `freeze` writes (config.json with a `momcompress` section carrying
"method", the tokenizer, model.safetensors, manifest.json with "stage": "baseline"): moefication and
prune folders load with `momcompress.load`; teal and wina folders too
(runtime/load.py hands them to baselines/load.py on the section's "method").
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from momcompress import __version__, ratio_rule
from momcompress.config import DTYPES, need
from momcompress.errors import ConfigError, DataError, RunDirError

log = logging.getLogger(__name__)

METHODS = ("moefication", "prune", "teal", "wina")
THRESHOLD_METHODS = ("teal", "wina")  # TealFFN layers: dense weights + per-layer thresholds
DEFAULT_CALIBRATION_TOKENS = 16384  # moefication, teal and wina; prune trains for learn's default budget
RATIO_TOLERANCE = ratio_rule.RATIO_TOLERANCE  # one tolerance and one behaviour for every method (ratio_rule.py)


@dataclass(frozen=True)
class BaselineConfig:
    """What a baseline computes (output paths and overwrite flags excluded).

    Attributes:
        target: fraction of FFN parameters read per token, in (0, 1).
        tokens: calibration tokens (moefication, teal, wina: default 16384; prune: learn's training tokens,
            turned into steps as `learn --tokens` does, default learn's --steps).
        steps: prune only: learn steps (default learn's default); `tokens` wins when both are given.
        eval_tokens: held-out tokens for the measured ratio and the perplexities (at least one window).
        seq_len: tokens per window.
        batch_size: windows per forward pass while collecting activations and measuring (teal and wina
            calibrate on all calibration windows in one forward pass).
        data: calibration text (None: the embedded novels; held-out text is then the Wikipedia
            paragraphs, else a held-out split of `data`).
        text_field: field holding the text in .jsonl / .parquet / datasets data.
        seed: seed of data split, clustering, router training and learn.
        device: "auto", "cpu", "cuda" or "cuda:N".
        dtype: model dtype.
        block_size: moefication and prune: neurons per block (None: as learn picks).
        experts: moefication only: experts per layer (None: chosen so k / E meets the target).
        split: teal and wina: how the budget is split between the gate/up input (kept fraction fx)
            and the down input (fh), (2 fx + fh) / 3 = target: "global" (one split for all layers,
            the grid point with the least KL divergence to the dense model on calibration tokens),
            "search" (per layer, least FFN output error, each token relative to its own output),
            "equal" (fx = fh = target) or "fixed" (fx = x_kept for every layer). See baselines/teal.py.
        x_kept: teal and wina with split="fixed" only: the kept fraction of the gate/up input.
        learn_options: prune only: further LearnConfig fields (lr, distill, ...).
    """

    target: float = 0.5
    tokens: int | None = None
    steps: int | None = None
    eval_tokens: int = 8192
    seq_len: int = 256
    batch_size: int = 8
    data: str | None = None
    text_field: str | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    block_size: int | None = None
    experts: int | None = None
    split: str = "global"
    x_kept: float | None = None
    learn_options: dict = field(default_factory=dict)

    def __post_init__(self):
        from momcompress.baselines.teal import SPLITS, check_fixed_fx

        need(0.0 < self.target < 1.0, f"--target must be in (0, 1) (a fraction of FFN parameters read), got {self.target}")
        need(self.seq_len >= 2, f"--seq-len must be >= 2, got {self.seq_len}")
        need(self.tokens is None or self.tokens >= self.seq_len, f"--tokens must be at least one window ({self.seq_len}), got {self.tokens}")
        need(self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(self.eval_tokens >= self.seq_len, f"--eval-tokens must be at least one window ({self.seq_len}): the ratio and perplexity are measured on held-out tokens")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.block_size is None or self.block_size >= 1, f"--block-size must be >= 1, got {self.block_size}")
        need(self.experts is None or self.experts >= 2, f"--experts must be >= 2, got {self.experts}")
        need(self.split in SPLITS, f"--split must be one of {SPLITS}, got {self.split!r}")
        need(self.split != "fixed" or self.x_kept is not None, "--split fixed needs --x-kept (the kept fraction of the gate/up input)")
        need(self.x_kept is None or self.split == "fixed", f"--x-kept goes with --split fixed (got --split {self.split}): drop --x-kept or pass --split fixed")
        if self.x_kept is not None:
            need(0.0 < self.x_kept <= 1.0, f"--x-kept must be in (0, 1], got {self.x_kept}")
            check_fixed_fx(self.x_kept, self.target)
        need(self.dtype in DTYPES, f"--dtype must be one of {DTYPES}, got {self.dtype!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def baseline(method: str, model: str | os.PathLike | None, output: str | os.PathLike, config: BaselineConfig | None = None, overwrite: bool = False) -> dict:
    """Build the METHOD baseline of MODEL into the frozen model folder OUTPUT and return its manifest.

    Args:
        method: "moefication", "prune", "teal" or "wina".
        model: Hugging Face model folder, .gguf file, or None / "default" for the embedded model.
        output: folder to create (written under a temporary name, then renamed).
        config: options (default BaselineConfig()).
        overwrite: replace an existing OUTPUT.
    """
    config = config or BaselineConfig()
    if method not in METHODS:
        raise ConfigError(f"unknown baseline method {method!r}; choose one of {', '.join(METHODS)}")
    out = Path(output)
    if out.exists() and not overwrite:
        raise RunDirError(f"output folder {out} exists: pass --overwrite to replace it, or choose another -o")
    if method == "prune":
        from momcompress.baselines.prune import prune

        return prune(model, out, config)
    return _build_in_place(method, model, out, config)


def _build_in_place(method: str, model, out: Path, config: BaselineConfig) -> dict:
    """moefication / teal / wina: load the dense model, measure it, convert its FFNs in place, measure, write."""
    from momcompress.learn.distributed import local_device
    from momcompress.metrics import perplexity
    from momcompress.models import default_block_size, ffn_width, load_model, model_fingerprint, resolve_model_dir
    from momcompress.sizes import param_breakdown

    t_start = time.time()
    model_dir = resolve_model_dir(model)
    dev = local_device(config.device)
    lm, tokenizer = load_model(model_dir, dtype=getattr(torch, config.dtype), device=dev)
    calib, heldout = calibration_and_heldout(tokenizer, config, config.tokens or DEFAULT_CALIBRATION_TOKENS)
    dense_parts = param_breakdown(lm)
    log.info("dense held-out perplexity on %d tokens", heldout.numel())
    ppl_dense = perplexity(lm, heldout, config.batch_size)

    t_cal = time.time()  # from here on, lm's FFNs are converted in place
    if method == "moefication":
        from momcompress.baselines.moefication import moefy

        block = config.block_size or default_block_size(ffn_width(lm))
        info = moefy(lm, calib, config.target, block, config.experts, config.batch_size, config.seed)
    else:
        from momcompress.baselines.teal import calibrate

        info = calibrate(lm, calib, config.target, config.split, score=method, x_kept=config.x_kept)
    cal_seconds = time.time() - t_cal

    # The rule every method follows (ratio_rule.py): the fit on the calibration tokens must meet the
    # target; ratio and perplexity are then reported on the held-out tokens.
    fit_ratio = measure_ratio(lm, calib, config.batch_size)[0]
    ratio_rule.check_fit(method, config.target, fit_ratio, RATIO_TOLERANCE, _remedy(method, info))
    ratio, per_layer, ppl = measure_ratio(lm, heldout, config.batch_size)
    parts = param_breakdown(lm)
    ffn_active = ffn_params_read(lm, per_layer, dense_parts["ffn"])
    section = {"format_version": _format_version(), "method": method, "target": config.target, "measured_ratio": ratio, "fit_ratio": fit_ratio}
    details: dict = {}
    blocks = None  # shared / routed / pruned block counts, for the formats made of blocks
    plans = None
    if method == "moefication":
        plans = info.pop("plans")
        quality = info.pop("router_quality")
        section.update({**info, "routing": "unit", "uniform_experts": True, "layers": [p.to_json() for p in plans]})
        counts = [p.counts() for p in plans]
        details = {
            "experts": info["num_experts"],
            "top_k": info["top_k"],
            "block_size": info["block_size"],
            "clustering": "balanced spherical k-means on neuron activation profiles (co-activation), experts contiguous after permutation",
            "router": "linear (E, d), BCE on each token's top-k experts by activation mass, trained on dense FFN inputs",
            "router_quality_per_layer": quality,
            "router_recall": sum(q["recall"] for q in quality) / len(quality),
            "router_mass_captured": sum(q["mass_captured"] for q in quality) / len(quality),
        }
        blocks = {"per_layer": counts, "total": {k: sum(c[k] for c in counts) for k in ("shared", "routed", "pruned")}}
    else:
        from momcompress.baselines.teal import teal_layers

        section.update({"activation": teal_layers(lm)[0].activation, "split": info["split"], "layers": info["layers"]})
        x_score = {"teal": "|x_j|", "wina": "|x_j| ||[W_gate; W_up][:, j]||"}[method]
        h_score = {"teal": "|h_i|", "wina": "|h_i| ||W_down[:, i]||"}[method]
        details = {
            "split": info["split"],
            "rule": f"keep x channel j when {x_score} > x_threshold and neuron i when {h_score} > h_threshold (per layer); "
            "read = (2 * kept x / d + kept h / F) / 3 of the FFN",
            # per layer: mean over calibration tokens of ||y_t - dense_t||^2 / ||dense_t||^2 of the FFN output
            "mean_token_error": sum(r["token_error"] for r in info["layers"]) / len(info["layers"]),
        }
        if "selection" in info:
            details["split_selection"] = info["selection"]
    manifest = _manifest(
        method, config, model_dir, model_fingerprint(model_dir), lm, calib, heldout, ratio, per_layer,
        dense_parts, parts, ffn_active, ppl_dense, ppl, cal_seconds, details, fit_ratio,
    )
    if blocks is not None:
        manifest["blocks"] = blocks
    write_baseline_folder(out, lm, tokenizer, model_dir, section, manifest, t_start, plans)
    return manifest


def calibration_and_heldout(tokenizer, config: BaselineConfig, calibration_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows (S, L), held-out windows (S2, L)), disjoint: the default novels and Wikipedia
    paragraphs, or a seeded split of the user's data."""
    from momcompress.calibration.data import build_token_batches

    batches = build_token_batches(
        tokenizer, config.data, config.seq_len, calibration_tokens, config.eval_tokens, config.seed, config.seq_len, config.text_field
    )
    if len(batches.heldout) == 0:
        raise DataError("no held-out tokens to measure the ratio and perplexity on: add data or lower --seq-len")
    return batches.train, batches.heldout


def sparse_layers(model) -> list:
    """The FFN modules that report a per-token read fraction (`track_stats` / `last_ratio`), in order."""
    from momcompress.baselines.teal import TealFFN
    from momcompress.runtime.mom_ffn import FrozenMoMFFN
    from momcompress.runtime.select_ffn import FrozenSelectFFN

    return [m for m in model.modules() if isinstance(m, (FrozenMoMFFN, FrozenSelectFFN, TealFFN))]


@torch.no_grad()
def measure_ratio(model, seqs: torch.Tensor, batch_size: int) -> tuple[float, list[float], float]:
    """One pass over seqs (S, L): the mean fraction of FFN parameters read per token (mean over layers,
    per layer) and the perplexity (as momcompress.metrics.perplexity)."""
    import torch.nn.functional as F

    layers = sparse_layers(model)
    if not layers:
        raise ValueError("the model has no sparse FFN layers (FrozenMoMFFN or TealFFN)")
    device = next(model.parameters()).device
    total = torch.zeros(len(layers), dtype=torch.float64)
    n, nll, scored = 0, 0.0, 0
    for m in layers:
        m.track_stats = True
    try:
        for start in tqdm(range(0, len(seqs), batch_size), desc="held-out ratio + perplexity", unit="batch", leave=False):
            batch = seqs[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (B, L-1, V)
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
            scored += batch[:, 1:].numel()
            total += torch.stack([m.last_ratio.double().sum().cpu() for m in layers])
            n += batch.numel()
    finally:
        for m in layers:
            m.track_stats, m.last_ratio = False, None
    per_layer = (total / max(n, 1)).tolist()
    return sum(per_layer) / len(per_layer), per_layer, math.exp(nll / max(scored, 1))


def ffn_params_read(model, ratio_per_layer: list[float], dense_ffn: int) -> int:
    """FFN parameters read per token, all layers: measured fraction x dense FFN size, plus routers."""
    from momcompress.runtime.mom_ffn import FrozenMoMFFN

    per_layer = dense_ffn / len(ratio_per_layer)
    routers = sum(m.router_params() for m in model.modules() if isinstance(m, FrozenMoMFFN))
    return int(round(sum(r * per_layer for r in ratio_per_layer))) + routers


def _format_version() -> int:
    from momcompress.modelio import FORMAT_VERSION

    return FORMAT_VERSION


def _remedy(method: str, info: dict) -> str:
    """What to change when METHOD's fit misses the target (ratio_rule.check_fit's advice)."""
    if method == "moefication":
        return (
            f"k / E = {info['top_k']}/{info['num_experts']} with equal experts of whole blocks is the nearest grid point: "
            "pass --experts or --block-size for another grid, or another --target"
        )
    return "choose another --target or more calibration tokens (--tokens)"


def _manifest(
    method, config, model_dir, model_hash, model, calib, heldout, ratio, per_layer, dense_parts, parts, ffn_active, ppl_dense, ppl, cal_seconds,
    details, fit_ratio,
) -> dict:
    from momcompress.calibration.data import describe_data
    from momcompress.modelio import library_versions
    from momcompress.sizes import active_params_per_token

    note = ratio_rule.heldout_note(config.target, fit_ratio, ratio, RATIO_TOLERANCE)
    if note:
        log.warning("%s: %s", method, note)
    return {
        "stage": "baseline",
        "method": method,
        "momcompress_version": __version__,
        "versions": library_versions(),
        "config": config.to_dict(),
        "source_model": str(model_dir.resolve()),
        "source_model_hash": model_hash,
        "architecture": model.config.model_type,
        "num_layers": len(per_layer),
        "target": config.target,
        "fit_ratio": fit_ratio,
        "measured_ratio": ratio,
        "measured_ratio_per_layer": per_layer,
        "ratio_rule": ratio_rule.describe(RATIO_TOLERANCE),
        "ratio_note": note,
        "heldout_tokens": int(heldout.numel()),
        "calibration": {
            "tokens": int(calib.numel()),
            "wall_seconds": cal_seconds,
            **describe_data(config.data),
        },
        "parameters": {
            "dense_total": dense_parts["total"],
            "baseline_total": parts["total"],
            "dense_ffn": dense_parts["ffn"],
            "baseline_ffn_stored": parts["ffn"],
            "ffn_active_per_token": ffn_active,
            "dense_ffn_active_per_token": dense_parts["ffn"],
            "model_active_per_token": active_params_per_token(model, ffn_active),
            "dense_model_active_per_token": active_params_per_token(model, dense_parts["ffn"]),
        },
        "perplexity": {"dense": ppl_dense, "baseline": ppl, "tokens": int(heldout.numel())},
        "details": details,
    }


def write_baseline_folder(out: Path, model, tokenizer, model_dir: Path, section: dict, manifest: dict, t_start: float, plans=None) -> None:
    """Write OUTPUT atomically, as freeze writes a frozen folder (config + section, tokenizer, weights, manifest;
    with plans, a MoM-format folder: block ids and the standalone modeling file too)."""
    from momcompress.modelio import write_model_folder

    out.parent.mkdir(parents=True, exist_ok=True)
    write_model_folder(out, model, tokenizer, section, model_dir, manifest, "baseline", t_start, plans)


def format_summary(manifest: dict) -> str:
    """A few lines for the CLI: ratio, calibration budget, parameters, perplexity."""
    p, ppl, cal = manifest["parameters"], manifest["perplexity"], manifest["calibration"]
    lines = [
        f"{manifest['method']}: target {manifest['target']:.3f}, fit ratio {manifest['fit_ratio']:.4f} on "
        f"{manifest['calibration']['tokens']} calibration tokens, measured ratio {manifest['measured_ratio']:.4f} "
        f"on {manifest['heldout_tokens']} held-out tokens",
        f"calibration: {cal['tokens']} tokens, {cal['wall_seconds']:.1f} s",
        f"active per token: FFN {p['ffn_active_per_token']:,} of {p['dense_ffn_active_per_token']:,} "
        f"({p['ffn_active_per_token'] / p['dense_ffn_active_per_token']:.3f}); whole model {p['model_active_per_token']:,} "
        f"of {p['dense_model_active_per_token']:,}",
        f"held-out perplexity: dense {ppl['dense']:.2f}, {manifest['method']} {ppl['baseline']:.2f} ({ppl['tokens']} tokens)",
    ]
    if manifest.get("ratio_note"):
        lines.insert(1, f"note: {manifest['ratio_note']}")
    return "\n".join(lines)
