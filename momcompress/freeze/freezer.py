"""`freeze`: turn a learn run into a loadable frozen model folder (DESIGN.md, "Freeze").

Orchestration only (the classification and repacking math is in plan.py, the runtime in
momcompress/runtime). Run it with `momcompress freeze RUN_DIR -o FROZEN_DIR`.

1. Read and check the run folder and its source model (sha256 must match the run's manifest).
2. Choose deterministic gates: one log_alpha offset, found by `match_target`, so that the activation
   ratio measured with the real router on calibration ("fit") tokens meets the target
   (momcompress.ratio_rule: the same rule as every baseline).
3. Classify blocks (shared / routed / pruned) and repack each FFN into a FrozenMoMFFN.
4. Check the frozen model against the learned one (logits, within a tolerance for the model's dtype),
   measure ratio and perplexity on held-out tokens the fit never saw, and write FROZEN_DIR:
   config.json (+ a `momcompress` section with counts, + `auto_map`), tokenizer, model.safetensors
   (weights and per-expert block lists), blocks.safetensors (original block ids), the standalone
   modeling file (plain transformers loading), manifest.json.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from momcompress import __version__, ratio_rule
from momcompress.config import LearnConfig
from momcompress.errors import ConfigError, DataError, FreezeCheckError, ModelLoadError, RunDirError
from momcompress.freeze.plan import LayerPlan, pad_uniform, padding_overhead, plan_layer, repack_layer
from momcompress.learn.gates import LOG_ALPHA_FULLY_OFF, deterministic_gates
from momcompress.learn.mom import gate_mode, mom_layers
from momcompress.learn.select import match_target, matched_gates
from momcompress.metrics import perplexity
from momcompress.learn.mom import wrap_with_mom
from momcompress.modelio import FORMAT_VERSION, detect_activation, library_versions, write_model_folder
from momcompress.models import decoder_layers, load_model, model_fingerprint
from momcompress.runtime.mom_ffn import frozen_layers
from momcompress.sizes import active_params_per_token, param_breakdown

log = logging.getLogger(__name__)

RUN_FILES = ("manifest.json", "masks.safetensors")
# Frozen vs learned logits, max |diff| relative to the largest |logit|, per model dtype. fp32 gives ~1e-6;
# bf16 / fp16 round every matmul to 8 / 11 mantissa bits and the two models sum in different orders
# (a tiny bf16 b = 1 run measured 5.5e-3), so their bounds are a few units of the dtype's epsilon.
LOGITS_RTOL = {torch.float32: 1e-4, torch.bfloat16: 4 * 2.0**-7, torch.float16: 8 * 2.0**-10}
# freeze --table-dtype: the selector FFN tables' dtype ("model": the model's own; "auto", the default: bfloat16 in an
# fp32 model, else the model's own).
TABLE_DTYPES = {"auto": "auto", "model": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_TABLE_DTYPE = "auto"


@dataclass
class LearnedRun:
    """A complete learn run folder, read and checked."""

    path: Path
    manifest: dict
    config: LearnConfig
    log_alpha: torch.Tensor | None  # (L, E, N) expert masks (selector "experts")
    router: torch.Tensor | None  # (L, E, d)
    weights: dict[str, torch.Tensor]  # tuned model weights (empty when weights were frozen)
    neuron_perm: torch.Tensor | None = None  # (L, F) order of the FFN neurons the blocks are cut from
    thresholds: torch.Tensor | None = None  # (L, 2) log-thresholds (x, h) of selector "activations"

    @property
    def experts(self) -> bool:
        return self.config.selector == "experts"


def read_run(run_dir: str | os.PathLike) -> LearnedRun:
    """Read RUN_DIR's manifest, masks and tuned weights; RunDirError names any missing or corrupt file."""
    path = Path(run_dir)
    if not path.is_dir():
        partial = path.with_name(path.name + ".partial")
        hint = f" ({partial} holds an unfinished run: finish it with `momcompress learn ... --resume`)" if partial.exists() else ""
        raise RunDirError(f"run folder {path} does not exist{hint}")
    for name in RUN_FILES:
        if not (path / name).is_file():
            raise RunDirError(f"{path} is not a complete learn run: {name} is missing (re-run `momcompress learn`)")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        config = LearnConfig.from_saved(manifest["config"])
        if manifest.get("stage") != "learn":
            raise ValueError(f"stage is {manifest.get('stage')!r}, not 'learn'")
        manifest["source_model"], manifest["source_model_hash"]  # noqa: B018 - presence check
    except Exception as exc:  # noqa: BLE001
        raise RunDirError(f"{path / 'manifest.json'} is corrupt or not a learn manifest ({exc}); re-run `momcompress learn`") from None
    try:
        masks = load_file(path / "masks.safetensors")
    except Exception as exc:  # noqa: BLE001
        raise RunDirError(f"{path / 'masks.safetensors'} is corrupt ({exc}); re-run `momcompress learn`") from None
    log_alpha = router = perm = thresholds = None
    if config.selector == "experts":
        log_alpha, router, perm = _expert_masks(path, manifest, config, masks)
    else:
        thresholds = masks.get("thresholds")
        L = manifest.get("num_layers")
        if thresholds is None or tuple(thresholds.shape) != (L, 2):
            raise RunDirError(f"{path / 'masks.safetensors'} holds no ({L}, 2) selector thresholds; re-run `momcompress learn`")
        thresholds = thresholds.float()
        if not torch.isfinite(thresholds).all():
            raise RunDirError(f"{path / 'masks.safetensors'} holds NaN or infinite thresholds; re-run learn")
    weights: dict[str, torch.Tensor] = {}
    if config.tune_weights:
        wfile = path / "weights.safetensors"
        if not wfile.is_file():
            raise RunDirError(f"{path} was learned with tuned weights but weights.safetensors is missing; re-run learn")
        try:
            weights = load_file(wfile)
        except Exception as exc:  # noqa: BLE001
            raise RunDirError(f"{wfile} is corrupt ({exc}); re-run `momcompress learn`") from None
    return LearnedRun(path, manifest, config, log_alpha, router, weights, perm, thresholds)


def _expert_masks(path: Path, manifest: dict, config: LearnConfig, masks: dict):
    """(log_alpha (L, E, N), router (L, E, d), neuron_perm (L, F) or None) of an expert-mask run, checked."""
    try:
        log_alpha, router = masks["log_alpha"].float(), masks["router"].float()
        perm = masks.get("neuron_perm")
    except Exception as exc:  # noqa: BLE001
        raise RunDirError(f"{path / 'masks.safetensors'} is corrupt ({exc}); re-run `momcompress learn`") from None
    L, E, N = log_alpha.shape
    if (L, E, N) != (manifest.get("num_layers"), config.experts, manifest.get("num_blocks")) or router.shape[:2] != (L, E):
        raise RunDirError(f"{path / 'masks.safetensors'} has gates {tuple(log_alpha.shape)} that do not match its manifest; re-run learn")
    if not torch.isfinite(log_alpha).all() or not torch.isfinite(router).all():
        raise RunDirError(f"{path / 'masks.safetensors'} holds NaN or infinite values; re-run learn")
    if perm is not None:
        ok = perm.dim() == 2 and perm.shape[0] == L and perm.shape[1] % N == 0
        if not ok or not torch.equal(perm.sort(dim=1).values, torch.arange(perm.shape[1]).expand_as(perm)):
            raise RunDirError(f"{path / 'masks.safetensors'} holds a neuron_perm that is not a permutation per layer; re-run learn")
    return log_alpha, router, perm


def resolve_source(run: LearnedRun, model: str | os.PathLike | None = None) -> Path:
    """The run's source model folder (or MODEL), checked against the run's sha256."""
    model_dir = Path(model) if model else Path(run.manifest["source_model"])
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(
            f"the run's source model {model_dir} is gone; pass --model PATH to the same model "
            f"(for the default model, `momcompress learn` re-creates it in the cache)"
        )
    if model_fingerprint(model_dir) != run.manifest["source_model_hash"]:
        raise ModelLoadError(
            f"the model in {model_dir} is not the one this run learned from (sha256 differs from the run's "
            "manifest): pass --model PATH to the original model, or learn again on this one"
        )
    return model_dir


def load_learned(run: LearnedRun, model_dir: Path, device: torch.device):
    """(learned model, tokenizer, dense parameter breakdown): the source model wrapped with the run's
    gates, routers and tuned weights; "dense" gate mode still gives the original model."""
    cfg = run.config
    # learn keeps fp32 masters of everything it trains whatever its compute dtype: build in fp32
    model, tokenizer = load_model(model_dir, dtype=torch.float32, device=device)
    dense_parts = param_breakdown(model)
    L, E, N = run.log_alpha.shape
    layers = decoder_layers(model)
    if len(layers) != L:
        raise RunDirError(f"the run has gates for {L} layers but {model_dir} has {len(layers)}")
    block_size = run.manifest["block_size"]
    mom = wrap_with_mom(model, E, cfg.top_k, block_size)
    with torch.no_grad():
        for i, m in enumerate(mom):
            m.log_alpha.copy_(run.log_alpha[i])
            m.router.weight.copy_(run.router[i])
            if run.neuron_perm is not None:
                if run.neuron_perm.shape[1] != m.mlp.gate_proj.out_features:
                    raise RunDirError(f"the run's neuron order has {run.neuron_perm.shape[1]} neurons but {model_dir} has {m.mlp.gate_proj.out_features}")
                m.permute_neurons(run.neuron_perm[i])
            if run.weights:
                m.freeze_reference()  # dense mode keeps the original FFN
        named = dict(model.named_parameters())
        for name, tensor in run.weights.items():
            if name not in named or named[name].shape != tensor.shape:
                raise RunDirError(f"{run.path / 'weights.safetensors'} holds {name} {tuple(tensor.shape)}, which this model lacks")
            named[name].copy_(tensor)
    model.requires_grad_(False)
    return model, tokenizer, dense_parts


def fit_and_heldout_tokens(run: LearnedRun, tokenizer, tokens: int | None, data: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit windows, held-out windows), disjoint, each up to `tokens` (default: the run's eval_tokens or 8192).

    The gate offset is fitted on the fit windows and ratio and perplexity are reported on the held-out
    ones: with the run's data, fit = its training text, held out = its held-out split (the default
    data's Wikipedia paragraphs); with DATA, a seeded half / half split of DATA's windows.
    """
    from momcompress.calibration.data import build_token_batches, is_default_data, pack_tokens, read_texts, split_sequences

    cfg = run.config
    want = tokens if tokens is not None else (cfg.eval_tokens or 8192)
    windows = max(1, -(-want // cfg.seq_len))
    if data is not None:
        seqs = pack_tokens(tokenizer, read_texts(data, cfg.text_field), cfg.seq_len, 2 * want)
        if len(seqs) < 2:
            raise DataError(f"{data} holds fewer than two {cfg.seq_len}-token windows: freeze needs one to fit the threshold on and one held out; pass more text")
        fit, heldout = split_sequences(seqs, 0.5, cfg.seed)
    elif is_default_data(cfg.data):
        # Fit on the calibration novels learn trained on; the held-out Wikipedia paragraphs are a separate source.
        batches = build_token_batches(tokenizer, None, cfg.seq_len, want, want, cfg.seed)
        fit, heldout = batches.train, batches.heldout
    else:
        if not cfg.eval_tokens:
            raise DataError(
                "the run kept no held-out tokens (eval_tokens 0) and its calibration text must not be reused: "
                "pass --data with held-out text"
            )
        world = run.manifest.get("world_size", 1)
        train_tokens = cfg.steps * cfg.batch_size * cfg.seq_len * world
        # The same call as learn made, so the split is the same and no training window leaks into the held-out part.
        batches = build_token_batches(tokenizer, cfg.data, cfg.seq_len, train_tokens, cfg.eval_tokens, cfg.seed, 1, cfg.text_field)
        fit, heldout = batches.train, batches.heldout
    fit, heldout = fit[:windows], heldout[:windows]
    if len(fit) == 0 or len(heldout) == 0:
        raise DataError("no calibration or held-out tokens to fit and measure the activation ratio on: pass --data with more text")
    return fit, heldout


def heldout_tokens(run: LearnedRun, tokenizer, tokens: int | None, data: str | None) -> torch.Tensor:
    """The held-out windows (S, L) freeze reports ratio and perplexity on (see fit_and_heldout_tokens)."""
    return fit_and_heldout_tokens(run, tokenizer, tokens, data)[1]


@torch.no_grad()
def measure_frozen_ratio(model, seqs: torch.Tensor, batch_size: int) -> tuple[float, list[float], list[float]]:
    """Measured activation ratio of a frozen model over seqs: (mean, per layer, mean blocks read per layer)."""
    layers = frozen_layers(model)
    device = next(model.parameters()).device
    ratio = torch.zeros(len(layers), dtype=torch.float64)
    blocks = torch.zeros(len(layers), dtype=torch.float64)
    n = 0
    for m in layers:
        m.track_stats = True
    try:
        for start in range(0, len(seqs), batch_size):
            batch = seqs[start : start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            ratio += torch.stack([m.last_ratio.double().sum().cpu() for m in layers])
            blocks += torch.stack([(m.last_ratio.double() * m.num_blocks).sum().cpu() for m in layers])
            n += batch.numel()
    finally:
        for m in layers:
            m.track_stats, m.last_ratio = False, None
    ratio, blocks = ratio / max(n, 1), blocks / max(n, 1)
    return float(ratio.mean()), ratio.tolist(), blocks.tolist()


def _logits(model, seqs: torch.Tensor, device) -> torch.Tensor:
    return model(input_ids=seqs.to(device), use_cache=False).logits.float().cpu()


# Share of tokens whose frozen layer output may differ from the learned one's: a per-token selector's
# score that lies on its threshold can flip with the summation order (hard masks), and that token's
# output then differs by one channel's or neuron's contribution. A repacking error hits most tokens.
SELECT_FLIP_FRACTION = 0.01


def _capture_layer_io(model, layers, seqs: torch.Tensor, device) -> tuple[torch.Tensor, list]:
    """The model's logits on seqs and each layer's (input, output), captured in the same forward."""
    captured = []

    def hook(_module, args, output):
        captured.append((args[0].detach().clone(), output.detach().clone()))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        logits = _logits(model, seqs, device)
    finally:
        for h in handles:
            h.remove()
    return logits, captured


def check_select_layers(frozen_layers, captured, rtol: float) -> dict:
    """Each frozen selector layer on the learned layer's own inputs: per token, the output within rtol
    (relative to the layer's largest output) of the learned one, except at most SELECT_FLIP_FRACTION of
    the tokens (threshold ties). Layers are compared on the same inputs, so one tie does not travel
    through the rest of the model as it does in the whole-model logits. FreezeCheckError on a miss."""
    worst = 1.0
    for i, (layer, (x, y)) in enumerate(zip(frozen_layers, captured)):
        with torch.no_grad():
            out = layer(x.to(layer.gate_up.dtype)).float()
        ref = y.float()
        err = (out - ref).abs().reshape(-1, ref.shape[-1]).amax(-1)  # (tokens,)
        scale = ref.abs().max().clamp_min(1e-12)
        matching = float((err <= rtol * scale).float().mean())
        worst = min(worst, matching)
        if matching < 1.0 - SELECT_FLIP_FRACTION:
            raise FreezeCheckError(
                f"layer {i}: the frozen FFN's output differs from the learned one's by more than {rtol:.1e} (relative to its "
                f"largest output) on {1 - matching:.1%} of the tokens, more than the {SELECT_FLIP_FRACTION:.0%} that threshold "
                "ties explain: nothing was written. This is a freeze bug unless the run's weights are damaged; please report it "
                "with the run folder"
            )
    return {"worst_matching_fraction": worst, "layers": len(captured)}


def freeze(
    run_dir: str | os.PathLike,
    output: str | os.PathLike,
    target: float | None = None,
    tokens: int | None = None,
    data: str | None = None,
    tolerance: float = ratio_rule.RATIO_TOLERANCE,
    uniform_experts: bool = False,
    model: str | os.PathLike | None = None,
    overwrite: bool = False,
    device: str = "auto",
    batch_size: int = 8,
    table_dtype: str = DEFAULT_TABLE_DTYPE,
) -> dict:
    """Freeze the learn run RUN_DIR into the model folder OUTPUT and return its manifest.

    Args:
        run_dir: a complete `learn` run folder.
        output: frozen model folder to create (written under a temporary name, then renamed).
        target: activation ratio to meet (default: the run's target).
        tokens: tokens to fit the threshold on, and again to measure on (default: the run's eval_tokens).
        data: text to use instead of the run's data (half to fit the threshold on, half held out).
        tolerance: largest accepted |ratio on the fit tokens - target| (momcompress.ratio_rule).
        uniform_experts: pad experts to equal width (zero blocks) for runtimes that need it.
        model: the source model's folder, when it moved since learn ran (its sha256 must match).
        overwrite: replace an existing OUTPUT.
        device: "auto", "cpu", "cuda" or "cuda:N".
        batch_size: windows per forward pass while measuring.
        table_dtype: per-token selector runs: dtype of the FFN tables (gate_up, down): "model" (as the model),
            or "bfloat16" / "float16" in an fp32 model, which halves the bytes a token reads (the row kernels
            multiply in fp32; the thresholds stay fp32); "auto" (the default): bfloat16 in an fp32 model, else as
            the model (on the default model: held-out perplexity 30.88 against 30.83 with fp32 tables, and half the
            FFN bytes per token; README "16-bit FFN tables"). The held-out perplexity is measured with the rounded
            tables. Expert-mask runs take "auto" or "model" (their tables are the model's dtype).
    """
    from momcompress.learn.distributed import local_device

    t_start = time.time()
    out = Path(output)
    if out.exists() and not overwrite:
        raise RunDirError(f"output folder {out} exists: pass --overwrite to replace it, or choose another -o")
    run = read_run(run_dir)
    target = run.config.target if target is None else float(target)
    if not 0.0 < target < 1.0:
        raise ConfigError(f"target must be in (0, 1), got {target}")
    if not 0.0 < tolerance < 0.5:
        raise ConfigError(f"tolerance must be in (0, 0.5), got {tolerance}")
    model_dir = resolve_source(run, model)
    dev = local_device(device)
    if table_dtype not in TABLE_DTYPES:
        raise ConfigError(f"table dtype must be one of {sorted(TABLE_DTYPES)}, got {table_dtype!r}")
    if not run.experts:
        if uniform_experts:
            raise ConfigError("--uniform-experts applies to expert-mask runs only; this run learned the per-token selector")
        return _freeze_selector(run, run_dir, out, target, tokens, data, tolerance, model_dir, dev, batch_size, t_start,
                                TABLE_DTYPES[table_dtype])
    if table_dtype not in ("model", "auto"):
        raise ConfigError("--table-dtype applies to per-token selector runs (learn --selector activations); this run "
                          "learned expert masks: freeze without it")
    learned, tokenizer, dense_parts = load_learned(run, model_dir, dev)
    learned.eval()
    fit, seqs = fit_and_heldout_tokens(run, tokenizer, tokens, data)
    n_tokens = int(seqs.numel())
    moms = mom_layers(learned)
    E, k, b, N = run.config.experts, run.config.top_k, run.manifest["block_size"], run.manifest["num_blocks"]

    log.info("fitting the gate offset to target %.3f on %d calibration tokens", target, fit.numel())
    offset, matched = match_target(learned, fit, target, batch_size, tol=min(0.005, tolerance / 2))
    ratio_rule.check_fit(
        "the learned gates", target, matched, tolerance,
        f"(gate offset {offset:+.3f}); freeze with --target {matched:.3f}, raise --tolerance, or learn with more blocks/experts",
    )
    check = seqs[: min(2, len(seqs))]
    with gate_mode(learned, "dense"):
        ppl_dense = perplexity(learned, seqs, batch_size)
    with matched_gates(learned, offset):
        ref_logits = _logits(learned, check, dev)

    plans: list[LayerPlan] = [plan_layer(deterministic_gates(m.log_alpha.detach().float() + offset)) for m in moms]  # (E, N) gates each
    if uniform_experts:
        plans = [pad_uniform(p) for p in plans]
    activation = detect_activation(moms[0].mlp.act_fn)
    for layer, mom, plan in zip(decoder_layers(learned), moms, plans):
        layer.mlp = repack_layer(mom.mlp, mom.router.weight, plan, k, b, activation)
    frozen = learned
    del moms, learned

    logits = _logits(frozen, check, dev)
    rel_diff = float((logits - ref_logits).abs().max() / ref_logits.abs().max().clamp_min(1e-12))
    dtype = next(frozen.parameters()).dtype
    rtol = LOGITS_RTOL.get(dtype, LOGITS_RTOL[torch.float32])
    if not rel_diff <= rtol:  # also catches NaN
        raise FreezeCheckError(
            f"the frozen model's logits differ from the learned model's by {rel_diff:.2e} (relative to the largest logit), "
            f"more than the {rtol:.1e} allowed for {str(dtype).removeprefix('torch.')}: nothing was written. This is a freeze bug "
            "unless the run's weights are damaged; please report it with the run folder"
        )
    ratio, ratio_per_layer, blocks_per_layer = measure_frozen_ratio(frozen, seqs, batch_size)
    ppl_frozen = perplexity(frozen, seqs, batch_size)
    note = ratio_rule.heldout_note(target, matched, ratio, tolerance)
    if note:
        log.warning("%s", note)

    d = frozen.get_input_embeddings().weight.shape[1]
    frozen_parts = param_breakdown(frozen)
    ffn_active = int(round(sum(blk * 3 * b * d for blk in blocks_per_layer))) + len(plans) * E * d
    counts = [p.counts() for p in plans]
    totals = {key: sum(c[key] for c in counts) for key in ("shared", "routed", "pruned")}
    section = {
        "format_version": FORMAT_VERSION,
        "num_experts": E,
        "top_k": k,
        "block_size": b,
        "num_blocks": N,
        "activation": activation,
        "routing": "renormalized",
        "uniform_experts": uniform_experts,
        "target": target,
        "measured_ratio": ratio,
        "fit_ratio": matched,
        "gate_offset": offset,
        "layers": [p.to_json() for p in plans],
    }
    manifest = {
        "stage": "freeze",
        "momcompress_version": __version__,
        "versions": library_versions(),
        "run_dir": str(Path(run_dir).resolve()),
        "source_model": str(model_dir.resolve()),
        "source_model_hash": run.manifest["source_model_hash"],
        "architecture": frozen.config.model_type,
        "experts": E,
        "top_k": k,
        "block_size": b,
        "num_blocks": N,
        "num_layers": len(plans),
        "uniform_experts": uniform_experts,
        "padding_overhead": padding_overhead(plans) if uniform_experts else 0.0,
        "threshold": {
            "gate_offset": offset,
            "rule": f"a block is on in an expert when log_alpha + ({offset:+.4f}) > {LOG_ALPHA_FULLY_OFF:.4f} "
            "(its deterministic hard-concrete gate is > 0); the offset was bisected so that the ratio measured on the "
            "fit (calibration) tokens meets the target",
        },
        "ratio_rule": ratio_rule.describe(tolerance),
        "target": target,
        "fit_tokens": int(fit.numel()),
        "fit_ratio": matched,
        "heldout_tokens": n_tokens,
        "measured_ratio": ratio,
        "ratio_note": note,
        "measured_ratio_per_layer": ratio_per_layer,
        "blocks": {"per_layer": counts, "total": totals},
        "parameters": {
            "dense_total": dense_parts["total"],
            "frozen_total": frozen_parts["total"],
            "dense_ffn": dense_parts["ffn"],
            "frozen_ffn_stored": frozen_parts["ffn"],
            "ffn_active_per_token": ffn_active,
            "dense_ffn_active_per_token": dense_parts["ffn"],
            "model_active_per_token": active_params_per_token(frozen, ffn_active),
            "dense_model_active_per_token": active_params_per_token(frozen, dense_parts["ffn"]),
        },
        "checks": {"logits_max_rel_diff": rel_diff, "logits_rtol": rtol},
        "perplexity": {"dense": ppl_dense, "frozen": ppl_frozen, "tokens": n_tokens},
    }
    log.info("frozen: measured ratio %.4f, perplexity dense %.2f vs frozen %.2f", ratio, ppl_dense, ppl_frozen)

    write_model_folder(out, frozen, tokenizer, section, model_dir, manifest, "frozen", t_start, plans)
    return manifest


def load_learned_selector(run: LearnedRun, model_dir: Path, device: torch.device):
    """(learned selector model, tokenizer, dense parameter breakdown) in fp32: the source model wrapped with
    the run's thresholds and tuned weights; "dense" gate mode still gives the original model."""
    from momcompress.learn.selector import wrap_with_select

    model, tokenizer = load_model(model_dir, dtype=torch.float32, device=device)
    dense_parts = param_breakdown(model)
    layers = wrap_with_select(model)
    if len(layers) != len(run.thresholds):
        raise RunDirError(f"the run has thresholds for {len(run.thresholds)} layers but {model_dir} has {len(layers)}")
    with torch.no_grad():
        for m, (tx, th) in zip(layers, run.thresholds):
            m.theta_x.fill_(float(tx))
            m.theta_h.fill_(float(th))
            if run.weights:
                m.freeze_reference()
        named = dict(model.named_parameters())
        for name, tensor in run.weights.items():
            if name not in named or named[name].shape != tensor.shape:
                raise RunDirError(f"{run.path / 'weights.safetensors'} holds {name} {tuple(tensor.shape)}, which this model lacks")
            named[name].copy_(tensor)
    model.requires_grad_(False)
    return model, tokenizer, dense_parts


@torch.no_grad()
def _keep_counts(model, seqs: torch.Tensor, batch_size: int) -> list[list]:
    """Per selector layer [(d,) channel keep counts, (F,) neuron keep counts, tokens] over seqs."""
    from momcompress.learn.mom import gate_mode, tracking
    from momcompress.learn.selector import select_layers

    layers = select_layers(model)
    device = next(model.parameters()).device
    counts = [[torch.zeros(m.hidden, device=device), torch.zeros(m.width, device=device), 0] for m in layers]
    for m, c in zip(layers, counts):
        m.keep_counts = c
    try:
        with gate_mode(model, "deterministic"), tracking(model):
            for start in range(0, len(seqs), batch_size):
                model(input_ids=seqs[start : start + batch_size].to(device), use_cache=False)
    finally:
        for m in layers:
            m.keep_counts = None
    return counts


def _freeze_selector(run: LearnedRun, run_dir, out: Path, target: float, tokens, data, tolerance: float, model_dir: Path,
                     dev, batch_size: int, t_start: float, table_dtype: torch.dtype | str | None = None) -> dict:
    """freeze() for a per-token selector run: fit one threshold offset, classify, repack, check, write."""
    from momcompress.freeze.select_plan import plan_select_layer, repack_select_layer
    from momcompress.learn.selector import match_select_target, select_layers, set_offset
    from momcompress.runtime.select_ffn import select_layers as frozen_select_layers

    learned, tokenizer, dense_parts = load_learned_selector(run, model_dir, dev)
    learned.eval()
    fit, seqs = fit_and_heldout_tokens(run, tokenizer, tokens, data)
    n_tokens = int(seqs.numel())
    log.info("fitting the threshold offset to target %.3f on %d calibration tokens", target, fit.numel())
    offset, matched = match_select_target(learned, fit, target, batch_size, tol=min(0.005, tolerance / 2))
    ratio_rule.check_fit(
        "the learned thresholds", target, matched, tolerance,
        f"(threshold offset {offset:+.3f}); freeze with --target {matched:.3f}, raise --tolerance, or pass more --tokens",
    )
    with gate_mode(learned, "dense"):
        ppl_dense = perplexity(learned, seqs, batch_size)
    counts = _keep_counts(learned, fit, batch_size)  # offset still set
    check = fit[: min(2, len(fit))]  # the plan is exact on fit tokens: shared and pruned are what they did there
    layers = select_layers(learned)
    ref_logits, captured = _capture_layer_io(learned, layers, check, dev)
    plans = []
    activation = detect_activation(layers[0].mlp.act_fn)
    for layer, m, (cx, cn, n) in zip(decoder_layers(learned), layers, counts):
        tx, th = m.thresholds()
        plan = plan_select_layer(cx, cn, n, float(tx.detach()), float(th.detach()))
        x_thr, h_thr = m.threshold_vectors()
        layer.mlp = repack_select_layer(m.mlp, x_thr, h_thr, plan, activation)
        plans.append(plan)
    set_offset(learned, 0.0)
    frozen = learned
    del learned, layers

    dtype = next(frozen.parameters()).dtype
    rtol = LOGITS_RTOL.get(dtype, LOGITS_RTOL[torch.float32])
    layer_check = check_select_layers(frozen_select_layers(frozen), captured, rtol)
    logits = _logits(frozen, check, dev)
    rel_diff = float((logits - ref_logits).abs().max() / ref_logits.abs().max().clamp_min(1e-12))
    log.info("frozen vs learned: layer outputs within %.1e on %.4f of the tokens (worst layer), logits %.2e apart "
             "(hard thresholds: a score on the threshold may flip with the summation order, and the flip travels on)",
             rtol, layer_check["worst_matching_fraction"], rel_diff)
    table_diff = None
    if table_dtype == "auto":
        table_dtype = torch.bfloat16 if dtype == torch.float32 else None
    if narrow_tables(frozen_select_layers(frozen), table_dtype, dtype):
        table_diff = float((_logits(frozen, check, dev) - logits).abs().max() / logits.abs().max().clamp_min(1e-12))
        names = str(table_dtype).removeprefix("torch."), str(dtype).removeprefix("torch.")
        log.info("FFN tables stored as %s: logits %.2e apart from the %s tables' (held-out perplexity below: with "
                 "the %s tables)", names[0], table_diff, names[1], names[0])
    ratio, ratio_per_layer, selector_reads = measure_frozen_select_ratio(frozen, seqs, batch_size)
    ppl_frozen = perplexity(frozen, seqs, batch_size)
    note = ratio_rule.heldout_note(target, matched, ratio, tolerance)
    if note:
        log.warning("%s", note)
    frozen_parts = param_breakdown(frozen)
    ffn_active = int(round(ratio * dense_parts["ffn"])) + selector_reads
    counts_json = [p.counts() for p in plans]
    totals = {key: sum(c[key] for c in counts_json) for key in counts_json[0]}
    section = {
        "format_version": FORMAT_VERSION,
        "selector": "activations",
        "activation": activation,
        "table_dtype": str(table_dtype or dtype).removeprefix("torch."),
        "target": target,
        "measured_ratio": ratio,
        "fit_ratio": matched,
        "threshold_offset": offset,
        "layers": [p.to_json() for p in plans],
    }
    manifest = {
        "stage": "freeze",
        "selector": "activations",
        "momcompress_version": __version__,
        "versions": library_versions(),
        "run_dir": str(Path(run_dir).resolve()),
        "source_model": str(model_dir.resolve()),
        "source_model_hash": run.manifest["source_model_hash"],
        "architecture": frozen.config.model_type,
        "num_layers": len(plans),
        "table_dtype": str(table_dtype or dtype).removeprefix("torch."),
        "threshold": {
            "offset": offset,
            "rule": f"per layer, input channel j is read when |x_j| * ||[W_gate; W_up][:, j]|| > exp(theta_x {offset:+.4f}) and "
            f"neuron i when |h_i| * ||W_down[:, i]|| > exp(theta_h {offset:+.4f}); the offset was bisected so that the ratio "
            "measured on the fit (calibration) tokens meets the target",
        },
        "ratio_rule": ratio_rule.describe(tolerance),
        "target": target,
        "fit_tokens": int(fit.numel()),
        "fit_ratio": matched,
        "heldout_tokens": n_tokens,
        "measured_ratio": ratio,
        "ratio_note": note,
        "measured_ratio_per_layer": ratio_per_layer,
        "neurons": {"per_layer": counts_json, "total": totals},
        "parameters": {
            "dense_total": dense_parts["total"],
            "frozen_total": frozen_parts["total"],
            "dense_ffn": dense_parts["ffn"],
            "frozen_ffn_stored": frozen_parts["ffn"],
            "ffn_active_per_token": ffn_active,
            "selector_per_token": selector_reads,
            "dense_ffn_active_per_token": dense_parts["ffn"],
            "model_active_per_token": active_params_per_token(frozen, ffn_active),
            "dense_model_active_per_token": active_params_per_token(frozen, dense_parts["ffn"]),
        },
        "checks": {"logits_max_rel_diff": rel_diff, "logits_rtol": rtol, "checked_on": "fit windows",
                   "layer_outputs_rtol": rtol, "layer_outputs_matching_fraction": layer_check["worst_matching_fraction"],
                   "layer_outputs_allowed_flips": SELECT_FLIP_FRACTION,
                   "table_rounding_logits_rel_diff": table_diff},
        "perplexity": {"dense": ppl_dense, "frozen": ppl_frozen, "tokens": n_tokens},
    }
    log.info("frozen: measured ratio %.4f, perplexity dense %.2f vs frozen %.2f", ratio, ppl_dense, ppl_frozen)
    write_model_folder(out, frozen, tokenizer, section, model_dir, manifest, "frozen", t_start, plans)
    return manifest


def narrow_tables(layers, table_dtype: torch.dtype | None, model_dtype: torch.dtype) -> bool | None:
    """Store the selector layers' gate_up and down tables in table_dtype (freeze --table-dtype); True when they
    changed, None when table_dtype is None or the model's own dtype. 16-bit tables are for fp32 models only."""
    if table_dtype is None or table_dtype == model_dtype:
        return None
    if model_dtype != torch.float32:
        raise ConfigError(f"--table-dtype {str(table_dtype).removeprefix('torch.')} needs an fp32 model; this one is "
                          f"{str(model_dtype).removeprefix('torch.')} (its tables are 16-bit already): freeze without it")
    for m in layers:
        m.gate_up = torch.nn.Parameter(m.gate_up.detach().to(table_dtype).contiguous(), requires_grad=False)
        m.down = torch.nn.Parameter(m.down.detach().to(table_dtype).contiguous(), requires_grad=False)
    return True


@torch.no_grad()
def measure_frozen_select_ratio(model, seqs: torch.Tensor, batch_size: int) -> tuple[float, list[float], int]:
    """Measured read fraction of a frozen selector model over seqs: (mean, per layer, selector reads per token)."""
    from momcompress.runtime.select_ffn import select_layers as frozen_select_layers

    layers = frozen_select_layers(model)
    device = next(model.parameters()).device
    ratio = torch.zeros(len(layers), dtype=torch.float64)
    n = 0
    for m in layers:
        m.track_stats = True
    try:
        for start in range(0, len(seqs), batch_size):
            batch = seqs[start : start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            ratio += torch.stack([m.last_ratio.double().sum().cpu() for m in layers])
            n += batch.numel()
    finally:
        for m in layers:
            m.track_stats, m.last_ratio = False, None
    ratio = ratio / max(n, 1)
    return float(ratio.mean()), ratio.tolist(), sum(m.selector_params() for m in layers)


def format_block_table(manifest: dict) -> str:
    """Per-layer shared / routed / pruned block counts with totals (or, for a selector model, shared /
    per-token / pruned neurons and shared / pruned input channels), as a text table."""
    if "neurons" in manifest:
        rows = manifest["neurons"]["per_layer"]
        head = f"{'layer':>5} {'shared':>7} {'per-token':>9} {'pruned':>7} {'sh. ch.':>7} {'pr. ch.':>7} {'ratio':>7}"
        lines = [head]
        for i, (c, r) in enumerate(zip(rows, manifest["measured_ratio_per_layer"])):
            lines.append(f"{i:>5} {c['shared']:>7} {c['per_token']:>9} {c['pruned']:>7} {c['shared_channels']:>7} {c['pruned_channels']:>7} {r:>7.3f}")
        t = manifest["neurons"]["total"]
        lines.append(f"{'total':>5} {t['shared']:>7} {t['per_token']:>9} {t['pruned']:>7} {t['shared_channels']:>7} {t['pruned_channels']:>7} "
                     f"{manifest['measured_ratio']:>7.3f}")
        return "\n".join(lines)
    rows = manifest["blocks"]["per_layer"]
    lines = [f"{'layer':>5} {'shared':>7} {'routed':>7} {'pruned':>7} {'ratio':>7}"]
    for i, (c, r) in enumerate(zip(rows, manifest["measured_ratio_per_layer"])):
        lines.append(f"{i:>5} {c['shared']:>7} {c['routed']:>7} {c['pruned']:>7} {r:>7.3f}")
    t = manifest["blocks"]["total"]
    lines.append(f"{'total':>5} {t['shared']:>7} {t['routed']:>7} {t['pruned']:>7} {manifest['measured_ratio']:>7.3f}")
    return "\n".join(lines)
