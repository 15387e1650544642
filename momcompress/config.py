"""Configs of the pipeline stages: frozen dataclasses, validated on creation, with a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path

from momcompress.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
SELECTORS = ("activations", "experts")
# LearnConfig fields that only the expert masks use (an error with --selector activations when changed).
EXPERT_OPTIONS = (
    "experts", "top_k", "block_size", "lr", "router_lr", "lambda_lr", "control", "layerwise_steps", "layerwise_tokens",
    "balance_weight", "ratio_grad_temperature", "log_alpha_init", "init", "permute",
)
LEARN_DTYPES = ("auto",) + DTYPES


def need(ok: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless ok: the configs' validation, one check per line."""
    if not ok:
        raise ConfigError(msg)


@dataclass(frozen=True)
class LearnConfig:
    """Everything that decides what `learn` computes (output paths and resume flags excluded).

    Attributes:
        target: activation ratio to reach, the fraction of FFN parameters read per token, in (0, 1).
        selector: how each token's FFN neurons are chosen: "activations" (per-token thresholds on the
            token's own WINA-scored activations, learned per layer; learn/selector.py; the default) or
            "experts" (the paper's form: one learned mask per expert plus a router; learn/mom.py). The
            options from `experts` to `permute` below (but `init_tokens`) apply to "experts" only.
        threshold_lr: selector "activations": step of the per-layer log-thresholds (normalised over
            all layers; see learn/selector.py).
        experts: experts (masks) per layer.
        top_k: experts each token uses.
        block_size: neurons per gate block (default 1: single neurons, the best quality measured on the
            default model); None picks the largest power of two <= 64 leaving >= 96 blocks.
        steps: optimisation steps (global batches); None: 100 for "activations" (its held-out perplexity
            moved 0.1 from step 100 to 150 on the default model), 150 for "experts".
        batch_size: sequences per step (per process under torchrun).
        seq_len: tokens per sequence.
        lr: Adam learning rate of the gates' log_alpha.
        router_lr: Adam learning rate of the routers.
        weight_lr: learning rate of the model's own weights (only with tune_weights).
        lambda_lr: gradient-ascent step of the Lagrange multipliers (control "lagrangian").
        control: "projection" (shift all log_alpha each step so the expected ratio follows the
            schedule exactly; default) or "lagrangian" (multipliers only); see learn/lagrangian.py.
        warmup: fraction of all steps (layer-wise phase included) over which the target falls linearly
            from 1 to `target` (None: 0.3 for "experts", 0 for "activations", whose init already reads
            the target).
        layerwise_steps: steps of the layer-wise phase run before the end-to-end steps: each FFN's
            gates and router matched to the dense FFN on cached inputs (learn/layerwise.py).
        layerwise_tokens: calibration tokens whose FFN inputs and outputs the layer-wise phase caches.
        distill: train on KL divergence to the dense model's logits (else on the LM loss).
        lm_weight: weight of the LM loss added to the distillation loss.
        tune_weights: also train the model's FFN weights (the paper's continued training).
        balance_weight: weight of the router's load-balancing loss.
        ratio_grad_temperature: widens the sigmoid behind the ratio penalty's gradient (1 = exact).
        log_alpha_init: initial log_alpha (>= 2.4 keeps every gate on: the model starts dense).
        init: "importance" (routers from k-means of FFN inputs, gates ordered by block energy per
            cluster, every gate still on) or "uniform" (random routers, equal gates).
        init_tokens: calibration tokens used by the importance init (experts) or to place the initial
            thresholds (activations).
        permute: with the importance init, first reorder each FFN's neurons so that every block
            groups neurons that are active together (function-preserving; kept in the run).
        data: calibration data (None = the default novels); see momcompress.calibration.data.
        text_field: field holding the text in .jsonl / .parquet / datasets data (None: text, content, ...).
        eval_tokens: held-out tokens for the final perplexity and ratio (0 = skip).
        seed: seed of data order, gate noise and init.
        device: "auto", "cpu", "cuda" or "cuda:N".
        dtype: compute dtype of learn: "auto" (bf16 mixed precision where the device has fast bf16, else
            float32), "float32", or "bfloat16" / "float16" (mixed precision: fp32 masters for gates,
            routers and tuned weights; frozen weights and the teacher in that dtype; autocast).
        checkpoint_every: steps between checkpoints.
        log_every: steps between one-line summaries on stderr.
    """

    target: float = 0.5
    selector: str = "activations"
    threshold_lr: float = 0.02
    experts: int = 64
    top_k: int = 1
    block_size: int | None = 1
    steps: int | None = None
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 0.3
    router_lr: float = 1e-3
    weight_lr: float = 3e-4
    lambda_lr: float = 2.0
    control: str = "projection"
    warmup: float | None = None
    layerwise_steps: int = 0
    layerwise_tokens: int = 32768
    distill: bool = True
    lm_weight: float = 0.0
    tune_weights: bool = True
    balance_weight: float = 0.01
    ratio_grad_temperature: float = 4.0
    log_alpha_init: float = 3.0
    init: str = "importance"
    init_tokens: int = 16384
    permute: bool = True
    data: str | None = None
    text_field: str | None = None
    eval_tokens: int = 8192
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    checkpoint_every: int = 25
    log_every: int = 10

    def __post_init__(self):
        need(0.0 < self.target < 1.0, f"--target must be in (0, 1) (a fraction of FFN parameters read), got {self.target}")
        need(self.experts >= 1, f"--experts must be >= 1, got {self.experts}")
        need(1 <= self.top_k <= self.experts, f"--top-k must be between 1 and --experts ({self.experts}), got {self.top_k}")
        need(self.block_size is None or self.block_size >= 1, f"--block-size must be >= 1, got {self.block_size}")
        if self.steps is None:
            object.__setattr__(self, "steps", 150 if self.selector == "experts" else 100)  # frozen dataclass
        need(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(self.layerwise_steps >= 0, f"--layerwise-steps must be >= 0, got {self.layerwise_steps}")
        need(self.layerwise_tokens >= 1, f"--layerwise-tokens must be >= 1, got {self.layerwise_tokens}")
        need(self.batch_size >= 1 and self.seq_len >= 2, "--batch-size must be >= 1 and --seq-len >= 2")
        for name in ("lr", "router_lr", "weight_lr", "lambda_lr"):
            need(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0")
        need(self.warmup is None or 0.0 <= self.warmup <= 1.0, f"warmup must be a fraction of the steps in [0, 1], got {self.warmup}")
        need(self.selector in SELECTORS, f"--selector must be one of {SELECTORS}, got {self.selector!r}")
        need(self.threshold_lr >= 0, "--threshold-lr must be >= 0")
        if self.selector != "experts":
            changed = [f.name for f in fields(self) if f.name in EXPERT_OPTIONS and getattr(self, f.name) != f.default]
            need(not changed, f"{', '.join('--' + n.replace('_', '-') for n in changed)}: only the expert masks use this: "
                              "pass --selector experts to learn expert masks, or drop them")
        need(self.ratio_grad_temperature >= 1.0, "ratio_grad_temperature must be >= 1")
        need(self.control in ("projection", "lagrangian"), f"control must be 'projection' or 'lagrangian', got {self.control!r}")
        need(self.init in ("importance", "uniform"), f"init must be 'importance' or 'uniform', got {self.init!r}")
        need(self.dtype in LEARN_DTYPES, f"--dtype must be one of {LEARN_DTYPES}, got {self.dtype!r}")
        need(self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every and log_every must be >= 1")
        need(self.init_tokens >= 1 and self.eval_tokens >= 0, "init_tokens must be >= 1 and eval_tokens >= 0")

    @property
    def warmup_fraction(self) -> float:
        """The warm-up as a fraction of all steps (`warmup`, or the selector's default)."""
        if self.warmup is not None:
            return self.warmup
        return 0.3 if self.selector == "experts" else 0.0

    @property
    def total_steps(self) -> int:
        """Layer-wise steps plus end-to-end steps."""
        return self.layerwise_steps + self.steps

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_saved(cls, d: dict) -> "LearnConfig":
        """The config of a saved run (manifest or checkpoint); runs saved before selectors existed learned expert masks."""
        if "selector" not in d:
            d = {**d, "selector": "experts"}
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> "LearnConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown learn option(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"bad learn option: {exc}") from exc

    @classmethod
    def from_json(cls, s: str) -> "LearnConfig":
        return cls.from_saved(json.loads(s))


def read_config_file(path: str | Path) -> dict:
    """Read a YAML (or JSON) file of options; keys may use '-' or '_'."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
