"""`learn`: train per-expert block masks and routers on calibration text (DESIGN.md, "The MoM layer").

Orchestration only: the math lives in gates.py (hard-concrete), mom.py (the layer), lagrangian.py
(target control) and init.py. Run it with `momcompress learn MODEL --target 0.5 -o RUN_DIR`, or under
`torchrun --nproc_per_node N` for data parallel training.

The run folder is written as RUN_DIR.partial while training (checkpoints every few steps, resumable
with --resume) and renamed to RUN_DIR once complete, so RUN_DIR never holds a half-written run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from momcompress import __version__
from momcompress.config import LearnConfig
from momcompress.errors import ConfigError, DataError, RunDirError, TrainingDivergedError
from momcompress.fsutil import atomic_dir_write
from momcompress.hardware import ThreadGovernor
from momcompress.learn import distributed as ddp
from momcompress.learn.lagrangian import RatioController, routing_histogram, solve_offset
from momcompress.learn.layerwise import collect_pool, layerwise_loss, pool_batch
from momcompress.learn.losses import IGNORE_INDEX, head_logits, head_losses
from momcompress.learn.mom import gate_mode, tracking, wrap_with_mom
from momcompress.learn.select import expected_ratio, match_target, matched_gates, measure_ratio
from momcompress.learn.selector import (
    check_selector_target,
    init_thresholds,
    shift_thresholds,
    step_offset,
    threshold_step,
    wrap_with_select,
)
from momcompress.metrics import perplexity
from momcompress.models import (
    default_block_size,
    ffn_width,
    load_model,
    model_fingerprint,
    read_config,
    resolve_model_dir,
)

log = logging.getLogger(__name__)

MASKS_FILE = "masks.safetensors"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
LOG_FILE = "log.jsonl"
CHECKPOINT_DIR = "checkpoint"


@dataclass
class RunPaths:
    final: Path
    partial: Path

    @classmethod
    def of(cls, output: str | os.PathLike) -> "RunPaths":
        final = Path(output)
        return cls(final=final, partial=final.with_name(final.name + ".partial"))

    @property
    def checkpoint(self) -> Path:
        return self.partial / CHECKPOINT_DIR


def prepare_run_dir(paths: RunPaths, resume: bool, overwrite: bool) -> bool:
    """Check the output folder's state; return True when resuming from a checkpoint."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: pick one")
    if paths.final.exists() and not overwrite:
        if resume:
            raise RunDirError(f"{paths.final} is a complete run; nothing to resume (pass --overwrite to learn again)")
        raise RunDirError(f"output folder {paths.final} exists: pass --overwrite to replace it, or choose another -o")
    if resume:
        if not _has_checkpoint(paths):
            raise RunDirError(f"nothing to resume: {paths.checkpoint} has no checkpoint (start without --resume)")
        return True
    if paths.partial.exists():
        if not overwrite:
            raise RunDirError(
                f"an interrupted run is in {paths.partial}: pass --resume to continue it or --overwrite to start over"
            )
    return False


def resolve_block_size(config: LearnConfig, width: int) -> int:
    if config.block_size is None:
        return default_block_size(width)
    if width % config.block_size:
        divisors = [b for b in (64, 32, 16, 8, 4, 2, 1) if width % b == 0]
        raise ConfigError(
            f"--block-size {config.block_size} does not divide the FFN width {width}; "
            f"use one of {divisors} (or omit it for the default, single neurons)"
        )
    return config.block_size


def target_at(step: int, config: LearnConfig) -> float:
    """Scheduled target: linear from 1 to config.target over the warm-up steps, then constant.

    The schedule spans every step of the run, the layer-wise phase's first: with a long enough
    layer-wise phase the whole warm-up happens there, where steps are cheap.
    """
    if config.warmup_fraction <= 0:
        return config.target
    warm = max(1, round(config.warmup_fraction * config.total_steps))
    return 1.0 - (1.0 - config.target) * min(1.0, step / warm)


def _generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The step's gate-noise source, on the model's device (no host round trip for the noise)."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 131 + rank)


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively: a CUDA GPU with bf16, or a CPU with AMX / AVX512-bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    from momcompress.hardware import cpu_flags

    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype the matmuls run in: `auto` is bf16 where the hardware has it, else fp32."""
    if name == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    if name == "float16" and device.type == "cpu":
        raise ConfigError("--dtype float16 needs a GPU; on CPU use bfloat16 (or float32)")
    return getattr(torch, name)


class Learner:
    """Holds the wrapped model, optimiser and controller of one run.

    Mixed precision (any dtype but float32): everything that trains (gates, routers, tuned FFN
    weights) keeps fp32 master tensors, and Adam updates those; every frozen weight (attention,
    embeddings, the frozen reference FFNs that serve as the teacher) is stored in the compute dtype,
    and the forward passes run under autocast, so each matmul runs in bf16. `full_precision()` puts
    the original fp32 frozen weights back (for the final evaluation and saving).
    """

    def __init__(self, model, config: LearnConfig, block_size: int, device: torch.device):
        self.model, self.config, self.device = model, config, device
        self.compute_dtype = compute_dtype(config.dtype, device)
        self.experts = config.selector == "experts"
        self.gate_params, self.router_params, self.threshold_params = [], [], []
        if self.experts:
            self.layers = wrap_with_mom(model, config.experts, config.top_k, block_size, config.log_alpha_init)
            for m in self.layers:
                m.ratio_grad_temperature = config.ratio_grad_temperature
                m.ratio_grad = config.control == "lagrangian"  # projection control needs no gradient of the ratio
            self.gate_params = [m.log_alpha for m in self.layers]
            self.router_params = [m.router.weight for m in self.layers]
        else:
            self.layers = wrap_with_select(model)
            self.threshold_params = [p for m in self.layers for p in (m.theta_x, m.theta_h)]
            for p in self.threshold_params:
                p.requires_grad_(config.threshold_lr > 0)
        self.weight_params = []
        if config.tune_weights:
            for m in self.layers:
                m.freeze_reference()
                for lin in (m.mlp.gate_proj, m.mlp.up_proj, m.mlp.down_proj):
                    lin.weight.requires_grad_(True)
                    self.weight_params.append(lin.weight)
        groups = [
            {"params": self.gate_params, "lr": config.lr, "name": "log_alpha"},
            {"params": self.router_params, "lr": config.router_lr, "name": "router"},
            {"params": self.weight_params, "lr": config.weight_lr, "name": "weights"},
        ]
        groups = [g for g in groups if g["params"]]
        # The thresholds take normalised gradient steps of their own (selector.threshold_step), not Adam's.
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999)) if groups else None
        self.controller = RatioController(config.target, config.lambda_lr, config.control)
        self.step = 0
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.pool = None  # ActivationPool of the layer-wise phase, set by learn() while it is needed
        # Frozen weights in the compute dtype; their fp32 originals kept to restore (full_precision).
        self._fp32_frozen: dict[str, torch.Tensor] = {}
        if self.compute_dtype != torch.float32:
            trained = {id(p) for p in self.trainable}
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if id(p) not in trained and p.dtype == torch.float32:
                        self._fp32_frozen[name] = p.data
                        p.data = p.data.to(self.compute_dtype)

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return self.gate_params + self.router_params + self.threshold_params + self.weight_params

    def autocast(self):
        """The context every forward pass of the run goes through (a no-op in float32)."""
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)

    def full_precision(self) -> None:
        """Put the original fp32 frozen weights back (ends mixed precision: evaluation, saving)."""
        named = dict(self.model.named_parameters())
        for name, data in self._fp32_frozen.items():
            named[name].data = data
        self._fp32_frozen = {}
        self.compute_dtype = torch.float32

    def _hidden(self, batch: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B * L, d) of the decoder (after its final norm), before the LM head."""
        out = self.model.model(input_ids=batch, use_cache=False).last_hidden_state
        return out.reshape(-1, out.shape[-1])

    def train_step(self, batch: torch.Tensor, rank: int) -> dict:
        """One optimisation step on batch (B, L); returns the step's metrics."""
        cfg = self.config
        target = target_at(self.step, cfg)
        gen = _generator(cfg.seed, self.step, rank, self.device)
        for m in self.layers:
            m.generator = gen
        teacher = None
        with self.autocast():
            if cfg.distill:
                with torch.no_grad(), gate_mode(self.model, "dense"):
                    teacher = head_logits(self._hidden(batch), self.head.weight, self.softcap)  # (T, V)
            with gate_mode(self.model, "sample"), tracking(self.model) as layers, self._keep_scores():
                hidden = self._hidden(batch)  # (T, d)
                ratio = torch.stack([m.last_stats.ratio for m in layers]).mean()
                balance = (torch.stack([m.last_stats.balance for m in layers]).mean() if self.experts
                           else ratio.new_zeros(()))
        labels = None
        lm_weight = cfg.lm_weight if cfg.distill else 1.0
        if lm_weight:  # no cross-entropy at all when its weight is 0
            labels = torch.full_like(batch, IGNORE_INDEX)
            labels[:, :-1] = batch[:, 1:]
            labels = labels.reshape(-1)
        main, kd, lm = head_losses(
            hidden, self.head.weight, teacher, labels, kd_weight=1.0 if cfg.distill else 0.0, lm_weight=lm_weight, softcap=self.softcap
        )
        return self._update(main, ratio, balance, layers, target, {"kd": kd, "lm": lm})

    @contextlib.contextmanager
    def _keep_scores(self):
        """Selector layers keep a sample of their log-scores for the step's projection."""
        keep = not self.experts
        for m in self.layers if keep else ():
            m.keep_scores = True
        try:
            yield
        finally:
            for m in self.layers if keep else ():
                m.keep_scores = False

    def layerwise_step(self, rank: int) -> dict:
        """One step of the layer-wise phase on a batch of the activation pool (see learn/layerwise.py)."""
        cfg = self.config
        if self.pool is None:
            raise RuntimeError("the layer-wise phase needs an activation pool (Learner.pool)")
        target = target_at(self.step, cfg)
        gen = _generator(cfg.seed, self.step, rank, self.device)
        for m in self.layers:
            m.generator = gen
        rows = pool_batch(self.pool, cfg.tokens_per_step, torch.Generator().manual_seed(cfg.seed * 7919 + self.step * 31 + rank))
        for p in self.weight_params:  # the FFN weights are tuned end to end only
            p.requires_grad_(False)
        try:
            with self.autocast(), gate_mode(self.model, "sample"), tracking(self.model) as layers:
                mse = layerwise_loss(self.layers, self.pool, rows)
                ratio = torch.stack([m.last_stats.ratio for m in layers]).mean()
                balance = torch.stack([m.last_stats.balance for m in layers]).mean()
            metrics = self._update(mse, ratio, balance, layers, target, {"mse": mse})
        finally:
            for p in self.weight_params:
                p.requires_grad_(True)
        metrics["phase"] = "layerwise"
        return metrics

    def _update(self, main: torch.Tensor, ratio, balance, layers, target: float, parts: dict) -> dict:
        """Backward and optimiser step on main + control penalty + balance; the step's metrics."""
        cfg = self.config
        penalty = self.controller.penalty(ratio, target)
        loss = main + penalty + cfg.balance_weight * balance
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"loss became {float(loss.detach())} at step {self.step}: training stopped; lower --lr"
                + (" or --weight-lr" if cfg.tune_weights else "")
                + " (or use --dtype float32) and resume from the last checkpoint with --resume"
            )
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        for p in self.threshold_params:
            p.grad = None
        if loss.requires_grad:
            loss.backward()
        ddp.average_gradients([p for p in self.trainable if p.requires_grad])
        if self.optimizer is not None:
            self.optimizer.step()
        if not self.experts:
            threshold_step(self.layers, cfg.threshold_lr)
            (offset,) = ddp.average_scalars([step_offset(self.layers, target_at(self.step + 1, cfg))], self.device)
            shift_thresholds(self.layers, offset)
            self.controller.last_offset = offset
        elif self.controller.mode == "projection":
            self._project(layers, target_at(self.step + 1, cfg))
        names = list(parts)
        values = ddp.average_scalars(
            [float(ratio.detach()), float(balance.detach())] + [float(parts[n].detach()) for n in names], self.device
        )
        ratio_v, bal_v = values[:2]
        self.controller.update(ratio_v, target)
        self.step += 1
        return {
            "step": self.step,
            "loss": float(loss.detach()),
            **dict(zip(names, values[2:])),
            "ratio": ratio_v,
            "target": target,
            "lambda1": self.controller.lambda1,
            "lambda2": self.controller.lambda2,
            "offset": self.controller.last_offset,
            "balance": bal_v,
        }

    @torch.no_grad()
    def _project(self, layers, next_target: float) -> None:
        """Shift every log_alpha by one offset so the expected ratio of this step's routing is next_target."""
        hists = [routing_histogram(m.last_stats.top_i, m.num_experts) for m in layers]
        offset = solve_offset([m.log_alpha.detach().float() for m in layers], hists, next_target)
        (offset,) = ddp.average_scalars([offset], self.device)
        for m in layers:
            m.log_alpha.add_(offset)
        self.controller.last_offset = offset

    # -- state ------------------------------------------------------------------------------------
    def mask_tensors(self) -> dict[str, torch.Tensor]:
        if not self.experts:  # per-layer log-thresholds (x, h) of the selector
            return {"thresholds": torch.stack([torch.stack([m.theta_x, m.theta_h]).detach().float().cpu() for m in self.layers]).contiguous()}  # (L, 2)
        out = {
            "log_alpha": torch.stack([p.detach().float().cpu() for p in self.gate_params]).contiguous(),  # (L, E, N)
            "router": torch.stack([p.detach().float().cpu() for p in self.router_params]).contiguous(),  # (L, E, d)
        }
        if any(m.neuron_perm is not None for m in self.layers):
            width = self.layers[0].mlp.gate_proj.out_features
            out["neuron_perm"] = torch.stack(
                [m.neuron_perm if m.neuron_perm is not None else torch.arange(width) for m in self.layers]
            ).contiguous()  # (L, F)
        return out

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: p.detach().cpu().contiguous() for p in self.weight_params}

    def save(self, folder: Path, extra: dict) -> None:
        save_file(self.mask_tensors(), folder / MASKS_FILE)
        if self.weight_params:
            save_file(self.weight_tensors(), folder / WEIGHTS_FILE)
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "controller": self.controller.state_dict(),
            "config": self.config.to_json(),
            **extra,
        }
        torch.save(state, folder / STATE_FILE)

    def load(self, folder: Path) -> dict:
        try:
            masks = load_file(folder / MASKS_FILE)
            state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
            weights = load_file(folder / WEIGHTS_FILE) if self.weight_params else {}
        except Exception as exc:  # noqa: BLE001 - any failure means an unreadable checkpoint
            raise RunDirError(f"checkpoint in {folder} is corrupt or incomplete ({exc}); start over with --overwrite") from exc
        saved_cfg = LearnConfig.from_json(state["config"])
        if saved_cfg != self.config:
            diff = {k: (v, getattr(self.config, k)) for k, v in saved_cfg.to_dict().items() if getattr(self.config, k) != v}
            raise RunDirError(f"--resume with different options than the checkpoint: {diff} (saved, now); use the same options")
        with torch.no_grad():
            if self.experts:
                la, router = masks["log_alpha"], masks["router"]
                if la.shape[0] != len(self.layers) or la.shape[1:] != self.gate_params[0].shape:
                    raise RunDirError(f"checkpoint gates have shape {tuple(la.shape)}, not this model's; wrong run folder?")
                for i, m in enumerate(self.layers):
                    m.log_alpha.copy_(la[i])
                    m.router.weight.copy_(router[i])
                    if "neuron_perm" in masks:
                        m.permute_neurons(masks["neuron_perm"][i])
            else:
                th = masks.get("thresholds")
                if th is None or th.shape != (len(self.layers), 2):
                    raise RunDirError(f"checkpoint in {folder} holds no (layers, 2) selector thresholds; wrong run folder?")
                for m, (tx, th_h) in zip(self.layers, th):
                    m.theta_x.fill_(float(tx))
                    m.theta_h.fill_(float(th_h))
            named = dict(self.model.named_parameters())
            for name, t in weights.items():
                named[name].copy_(t)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.controller.load_state_dict(state["controller"])
        self.step = int(state["step"])
        return state


def _checksum(learner: Learner) -> float:
    return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(learner.trainable)))


def learn(
    model: str | os.PathLike | None,
    output: str | os.PathLike,
    config: LearnConfig,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[dict], None] | None = None,
) -> dict:
    """Learn masks and routers for MODEL; write the run folder OUTPUT and return its manifest.

    Args:
        model: Hugging Face model folder, .gguf file, or None / "default" for the embedded model.
        output: run folder to create (written as OUTPUT.partial until complete).
        config: what to learn.
        resume: continue the interrupted run in OUTPUT.partial from its last checkpoint.
        overwrite: replace an existing OUTPUT (or OUTPUT.partial).
        on_step: called with each step's metrics (progress reporting, tests).
    """
    from momcompress.calibration.data import batch_for_step

    paths = RunPaths.of(output)
    resuming = prepare_run_dir(paths, resume, overwrite)
    model_dir = resolve_model_dir(model)
    read_config(model_dir)  # architecture check before any heavy work
    device = ddp.local_device(config.device)
    rank, world = ddp.init_from_env(device)
    main_rank = rank == 0
    t_start = time.time()
    try:
        dense, tokenizer = load_model(model_dir, dtype=torch.float32, device=device)  # fp32 masters; see Learner
        block_size = resolve_block_size(config, ffn_width(dense))
        train, heldout = learning_data(config, tokenizer, world)
        if config.eval_tokens and len(heldout) == 0:
            raise DataError("no held-out tokens for evaluation: add data or pass eval_tokens 0")
        if config.selector == "activations":
            check_selector_target(dense, config.target)
        learner = Learner(dense, config, block_size, device)
        source_hash = model_fingerprint(model_dir)
        if main_rank:
            if overwrite and not resuming:
                shutil.rmtree(paths.partial, ignore_errors=True)  # a stale interrupted run must not survive
            paths.partial.mkdir(parents=True, exist_ok=True)
        if resuming:
            ckpt = paths.checkpoint if (paths.checkpoint / STATE_FILE).is_file() else paths.partial / (CHECKPOINT_DIR + ".old")
            state = learner.load(ckpt)
            if state.get("source_model_hash") != source_hash:
                raise RunDirError(f"the source model {model_dir} changed since the checkpoint was written; resume needs the same model")
            log.info("resuming from step %d of %d", learner.step, config.total_steps)
        else:
            init_seqs = train[: max(1, math.ceil(config.init_tokens / config.seq_len))]
            if not learner.experts:
                with learner.autocast():
                    init_thresholds(dense, learner.layers, init_seqs, config.target)
            elif config.init == "importance":
                from momcompress.learn.init import importance_init

                with learner.autocast():
                    importance_init(
                        dense, learner.layers, init_seqs, config.batch_size, config.init_tokens, config.seed,
                        config.log_alpha_init, config.permute,
                    )
            ddp.broadcast_params(learner.trainable)
            if main_rank:
                (paths.partial / LOG_FILE).write_text("")
        if main_rank:
            _trim_log(paths.partial / LOG_FILE, learner.step)
        ckpt_extra = {"source_model_hash": source_hash}
        records = _train_loop(learner, train, batch_for_step, paths, rank, world, ckpt_extra, on_step)
        checks = ddp.gather_checksums(_checksum(learner))
        if len(set(checks)) != 1:
            raise RuntimeError(f"ranks diverged: gate checksums {checks}")
        if not main_rank:
            ddp.barrier()
            return {}
        manifest = _finish(learner, dense, heldout, train, model_dir, source_hash, block_size, world, checks, records, t_start)

        def write(folder: Path):
            learner.save(folder, ckpt_extra)
            shutil.copy(paths.partial / LOG_FILE, folder / LOG_FILE)
            (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))

        atomic_dir_write(paths.final, write)
        shutil.rmtree(paths.partial, ignore_errors=True)
        ddp.barrier()
        return manifest
    except BaseException:
        # Keep a resumable checkpoint; otherwise leave nothing behind.
        if main_rank and paths.partial.exists() and not _has_checkpoint(paths):
            shutil.rmtree(paths.partial, ignore_errors=True)
        raise
    finally:
        ddp.shutdown()


def _has_checkpoint(paths: RunPaths) -> bool:
    return (paths.checkpoint / STATE_FILE).is_file() or (paths.partial / (CHECKPOINT_DIR + ".old") / STATE_FILE).is_file()


def _train_loop(learner: Learner, train, batch_for_step, paths: RunPaths, rank: int, world: int, ckpt_extra: dict, on_step) -> list[dict]:
    cfg = learner.config
    main_rank = rank == 0
    records: list[dict] = []
    bar = tqdm(total=cfg.total_steps, initial=learner.step, desc="learn", disable=not main_rank, file=sys.stderr, dynamic_ncols=True)
    if learner.step < cfg.layerwise_steps:
        pool_seqs = train[: max(1, math.ceil(cfg.layerwise_tokens / cfg.seq_len))]
        with learner.autocast():
            learner.pool = collect_pool(learner.model, learner.layers, pool_seqs, cfg.batch_size, learner.compute_dtype)
    t_last, tokens_since = time.time(), 0
    logf = open(paths.partial / LOG_FILE, "a") if main_rank else None
    # On a shared CPU, as many threads as cores other programs leave free (hardware.ThreadGovernor).
    governor = ThreadGovernor() if learner.device.type == "cpu" and world == 1 else None
    if governor is not None:
        _report_threads(governor.settle())
    try:
        while learner.step < cfg.total_steps:
            if learner.step < cfg.layerwise_steps:
                metrics = learner.layerwise_step(rank)
            else:
                learner.pool = None  # the layer-wise phase is over
                e2e_step = learner.step - cfg.layerwise_steps
                batch = batch_for_step(train, e2e_step, cfg.batch_size, cfg.seed, rank, world).to(learner.device)
                metrics = learner.train_step(batch, rank)
            tokens_since += cfg.tokens_per_step * world
            now = time.time()
            metrics["tok_per_s"] = tokens_since / max(now - t_last, 1e-9)
            t_last, tokens_since = now, 0
            metrics["threads"] = torch.get_num_threads()
            if governor is not None:
                _report_threads(governor.update())
            records.append(metrics)
            if main_rank:
                logf.write(json.dumps(metrics) + "\n")
                logf.flush()
                control = ({"l1": f"{metrics['lambda1']:.2f}", "l2": f"{metrics['lambda2']:.2f}"} if learner.experts
                           else {"offset": f"{metrics['offset']:+.3f}"})
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", ratio=f"{metrics['ratio']:.3f}", target=f"{metrics['target']:.3f}",
                                **control, tok_s=f"{metrics['tok_per_s']:.0f}")
                bar.update(1)
                if learner.step % cfg.log_every == 0 or learner.step == cfg.total_steps:
                    parts = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("mse", "kd", "lm") if k in metrics and (k != "lm" or cfg.lm_weight or not cfg.distill))
                    control = (f"lambda {metrics['lambda1']:.2f}/{metrics['lambda2']:.2f}" if learner.experts
                               else f"threshold offset {metrics['offset']:+.3f}")
                    tqdm.write(
                        f"step {learner.step}: loss {metrics['loss']:.3f} ({parts}), "
                        f"ratio {metrics['ratio']:.3f}, target {metrics['target']:.3f}, {control}, {metrics['tok_per_s']:.0f} tok/s",
                        file=sys.stderr,
                    )
                if learner.step % cfg.checkpoint_every == 0 and learner.step < cfg.total_steps:
                    atomic_dir_write(paths.checkpoint, lambda d: learner.save(d, ckpt_extra))
            if on_step is not None:
                on_step(metrics)
    except TrainingDivergedError as exc:
        kept = f"; the last good checkpoint is in {paths.checkpoint}" if paths.checkpoint.exists() else "; no checkpoint was written yet"
        raise TrainingDivergedError(str(exc) + kept) from None
    finally:
        bar.close()
        if logf:
            logf.close()
        if governor is not None:
            torch.set_num_threads(governor.max_threads)  # the caller's count again
    return records


def _report_threads(change) -> None:
    if change is not None:
        old, new, others = change
        tqdm.write(f"threads {old} -> {new}: other programs used {others:.1f} cores", file=sys.stderr)


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (they are recomputed)."""
    if not path.exists():
        path.write_text("")
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def learning_data(config: LearnConfig, tokenizer, world: int = 1):
    """The run's (train, held-out) token windows: enough for every step (and the layer-wise pool)."""
    from momcompress.calibration.data import build_token_batches

    global_batch = config.batch_size * world
    need = max(config.steps * global_batch * config.seq_len, config.layerwise_tokens if config.layerwise_steps else 0)
    data = build_token_batches(
        tokenizer,
        config.data,
        seq_len=config.seq_len,
        train_tokens=need,
        heldout_tokens=config.eval_tokens,
        seed=config.seed,
        min_train_tokens=global_batch * config.seq_len,
        text_field=config.text_field,
    )
    return data.train, data.heldout


@torch.no_grad()
def heldout_metrics(model, eval_seqs: torch.Tensor, target: float, batch_size: int) -> dict:
    """Ratios and perplexities of a MoM-wrapped model on held-out windows: dense, and deterministic
    gates matched to TARGET (the figure freeze will reproduce)."""
    expected = expected_ratio(model, eval_seqs, batch_size)
    det_ratio, per_layer = measure_ratio(model, eval_seqs, batch_size)
    offset, matched = match_target(model, eval_seqs, target, batch_size)
    with gate_mode(model, "dense"):
        ppl_dense = perplexity(model, eval_seqs, batch_size)
    with matched_gates(model, offset):
        ppl_matched = perplexity(model, eval_seqs, batch_size)
    log.info("held-out perplexity: dense %.2f, learned %.2f at measured ratio %.3f", ppl_dense, ppl_matched, matched)
    return {
        "expected_ratio": expected,
        "eval_tokens": int(eval_seqs.numel()),
        "deterministic_ratio": det_ratio,
        "deterministic_ratio_per_layer": per_layer,
        "target_matched_offset": offset,
        "target_matched_ratio": matched,
        "perplexity_dense": ppl_dense,
        "perplexity_target_matched": ppl_matched,
    }


def final_heldout_metrics(model, config: LearnConfig, train: torch.Tensor, heldout: torch.Tensor) -> dict:
    """learn's final measurement of a wrapped model (fp32): held-out ratio and perplexity, dense vs learned,
    at the target (expert masks: gates matched as freeze matches them; selector: thresholds fitted on
    calibration windows, the ratio rule)."""
    batch = max(1, min(8, config.batch_size))
    if config.selector == "experts":
        return heldout_metrics(model, heldout, config.target, batch)
    fit_seqs = train[: max(1, math.ceil(config.eval_tokens / config.seq_len))]
    return selector_heldout_metrics(model, fit_seqs, heldout, config.target, batch)


@torch.no_grad()
def selector_heldout_metrics(model, fit_seqs: torch.Tensor, eval_seqs: torch.Tensor, target: float, batch_size: int) -> dict:
    """Ratio and perplexities of a selector model: one threshold offset fitted to TARGET on calibration
    windows (the ratio rule, as freeze does), then read fraction and perplexity on held-out windows."""
    from momcompress.learn.selector import match_select_target, measure_select_ratio, set_offset

    learned_ratio, _ = measure_select_ratio(model, eval_seqs, batch_size)
    offset, fit_ratio = match_select_target(model, fit_seqs, target, batch_size)
    try:
        ratio, per_layer = measure_select_ratio(model, eval_seqs, batch_size)
        ppl_matched = perplexity(model, eval_seqs, batch_size)
    finally:
        set_offset(model, 0.0)
    with gate_mode(model, "dense"):
        ppl_dense = perplexity(model, eval_seqs, batch_size)
    log.info("held-out perplexity: dense %.2f, learned %.2f at measured ratio %.3f", ppl_dense, ppl_matched, ratio)
    return {
        "eval_tokens": int(eval_seqs.numel()),
        "fit_tokens": int(fit_seqs.numel()),
        "learned_ratio": learned_ratio,  # the thresholds as trained, on the held-out windows
        "target_matched_offset": offset,
        "fit_ratio": fit_ratio,
        "target_matched_ratio": ratio,  # the fitted thresholds, on the held-out windows
        "deterministic_ratio_per_layer": per_layer,
        "perplexity_dense": ppl_dense,
        "perplexity_target_matched": ppl_matched,
    }


def _finish(learner, model, heldout, train, model_dir, source_hash, block_size, world, checks, records, t_start) -> dict:
    """Final measurements (rank 0): ratios, held-out perplexity dense vs learned; the manifest."""
    cfg = learner.config
    learner.full_precision()  # measure (and save) the model freeze will build: fp32, original frozen weights
    learner.model.eval()
    final = records[-1] if records else {}
    eval_seqs = heldout if len(heldout) else train[: max(1, cfg.eval_tokens // cfg.seq_len)]
    result = {
        "expected_ratio": final.get("ratio"),  # replaced by the held-out measurement below when there is one
        "expected_ratio_last_step": final.get("ratio"),
        "final_target": final.get("target"),
    }
    if cfg.eval_tokens and len(heldout):
        result.update(final_heldout_metrics(model, cfg, train, eval_seqs))
    import transformers

    last = records[-1] if records else {}
    return {
        "stage": "learn",
        "momcompress_version": __version__,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]},
        "config": learner.config.to_dict(),
        "source_model": str(model_dir.resolve()),
        "source_model_hash": source_hash,
        "architecture": model.config.model_type,
        "num_layers": len(learner.layers),
        "selector": cfg.selector,
        "ffn_width": learner.layers[0].mlp.gate_proj.out_features,
        "block_size": block_size,
        "num_blocks": learner.layers[0].mlp.gate_proj.out_features // block_size,
        "world_size": world,
        "rank_checksums": checks,
        "steps": learner.step,
        "train_tokens_seen": learner.step * cfg.tokens_per_step * world,
        "layerwise_steps": min(learner.step, cfg.layerwise_steps),
        "wall_seconds": time.time() - t_start,
        "final_losses": {k: last.get(k) for k in ("loss", "kd", "lm", "balance")},
        "lambdas": learner.controller.state_dict(),
        "metrics": result,
    }
