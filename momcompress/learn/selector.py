"""The per-token selector FFN in its training form (DESIGN.md, "Per-token selection").

Dense gated FFN: y = W_down (act(W_gate x) * (W_up x)), hidden size d, F neurons. For each token the
layer reads only what the token's own activations ask for, in two stages:
    x channels:  keep channel j when |x_j| * c_j > exp(theta_x)    c_j = ||[W_gate; W_up][:, j]||
    neurons:     h = act(W_gate x_s) * (W_up x_s) from the kept channels x_s only;
                 keep neuron i when |h_i| * n_i > exp(theta_h)     n_i = ||W_down[:, i]||
    y = W_down (h * keep_h)
The scores are WINA's (|activation| times the norm of the weight column it multiplies; Chen et al.
2025): the first stage reads the columns of W_gate and W_up of the kept channels, the second the
columns of W_down of the kept neurons, so a token reads (2 kept_x / d + kept_h / F) / 3 of the FFN,
plus the selector's own (d + F) score scales (`SELECTOR_READ`).

What learn trains: the FFN weights (distillation to the original model), and the two log-thresholds
of every layer, i.e. how the read budget is spread over the layers and over the two stages. The hard
masks run forward; the thresholds get their gradient through a sigmoid of the log-score margin
(straight-through). The loss alone always asks for lower thresholds (reading more helps), so after
each step one global offset, added to every threshold, puts the read of that step's tokens back on the
schedule (`project_offset`): what remains of a layer's step is how much more its reads were worth
than the others'. The ratio stays on the target at every step, as with the expert masks' projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from momcompress.errors import ConfigError, UnsupportedArchitectureError
from momcompress.models import decoder_layers

# Width, in log-score units, of the sigmoid that carries a threshold's gradient (straight-through).
SOFT_WIDTH = 0.5
# Log-scores kept per layer and stage from each training step's tokens (for the projection's bisection).
PROJECTION_TOKENS = 64
# Smallest kept neuron fraction of the initial split (low targets).
MIN_KEPT = 0.02
# Keeps the log of a zero score finite.
SCORE_EPS = 1e-12


def selector_read(hidden: int, width: int) -> float:
    """The selector's own reads per token, as a fraction of the FFN's 3 F d: the d + F score scales."""
    return (hidden + width) / (3.0 * hidden * width)


def check_selector_target(model: nn.Module, target: float) -> None:
    """ConfigError when the selector's own reads already exceed `target` (no budget left for the FFN)."""
    layer = decoder_layers(model)[0].mlp
    own = selector_read(layer.gate_proj.in_features, layer.gate_proj.out_features)
    if target <= own:
        raise ConfigError(
            f"--target {target} is below what the selector itself reads per token ({own:.4f} of the FFN: its score "
            "scales): choose a larger target"
        )


def read_fraction(kept_x: torch.Tensor, kept_h: torch.Tensor, hidden: int, width: int) -> torch.Tensor:
    """Fraction of the FFN's 3 F d parameters a token reads with kept_x channels and kept_h neurons."""
    return (2.0 * kept_x / hidden + kept_h / width) / 3.0


def initial_split(target: float) -> tuple[float, float]:
    """(kept channel fraction fx, kept neuron fraction fh) with (2 fx + fh) / 3 = target, for the init.

    fx = target + 0.05, fh = target - 0.1 (fh at least MIN_KEPT, fx at most 1): on the default model (untrained WINA
    scores, per-layer thresholds) this split read 35.3 at 0.5 against 39.5 for fx = fh, and neighbouring
    splits were within 0.6 (benchmarks/selector_study.py). Learning moves it per layer afterwards.
    """
    fx = min(1.0, target + 0.05)
    fh = 3.0 * target - 2.0 * fx
    if fh < MIN_KEPT:  # low targets: keep a few neurons, take the rest from the channels
        fh = min(MIN_KEPT, target)
        fx = (3.0 * target - fh) / 2.0
    return fx, fh


@dataclass
class SelectStats:
    """What one forward pass of a SelectFFN reports to the trainer (no graph)."""

    ratio: torch.Tensor  # () mean fraction of the FFN read over the call's tokens (hard masks)
    log_scores: tuple[torch.Tensor, torch.Tensor] | None  # sampled (x, h) log-scores for the projection


class SelectFFN(nn.Module):
    """Wraps a gated FFN module (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``) with the two-stage selector."""

    learned_ffn = True  # learn.mom.learned_layers finds it

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp
        self.hidden = mlp.gate_proj.in_features
        self.width = mlp.gate_proj.out_features
        device = mlp.gate_proj.weight.device
        # log thresholds on the x and h log-scores (fp32 scalars; set by init_thresholds)
        self.theta_x = nn.Parameter(torch.zeros((), device=device))
        self.theta_h = nn.Parameter(torch.zeros((), device=device))
        self.gate_mode = "deterministic"  # "dense": the original FFN; "sample": training (straight-through)
        self.offset = 0.0  # added to both thresholds (matching a target without touching the parameters)
        self.track_stats = False
        self.keep_scores = False
        self.score_samples = PROJECTION_TOKENS  # tokens whose log-scores are kept per call (keep_scores)
        self.keep_counts: list | None = None  # [(d,) channel, (F,) neuron keep counts, tokens] when counting
        self.last_stats: SelectStats | None = None
        self.reference_mlp: nn.Module | None = None  # frozen original FFN (teacher) when the weights are tuned

    def freeze_reference(self) -> None:
        """Keep a frozen copy of the current FFN weights as the dense reference (for weight tuning)."""
        import copy

        self.reference_mlp = copy.deepcopy(self.mlp).requires_grad_(False)

    @torch.no_grad()
    def score_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(c (d,), n (F,)) fp32: the norms of the weight columns each x channel and each neuron multiplies."""
        m = self.mlp
        c = (m.gate_proj.weight.float().pow(2).sum(0) + m.up_proj.weight.float().pow(2).sum(0)).sqrt()
        n = m.down_proj.weight.float().norm(dim=0)
        return c, n

    def thresholds(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.theta_x + self.offset, self.theta_h + self.offset

    def threshold_vectors(self, scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_threshold (d,), h_threshold (F,)) fp32: channel j is kept when |x_j| > x_threshold[j], neuron i
        when |h_i| > h_threshold[i]; exp(theta) / column norm, the form freeze stores (inf for a zero column).
        `scales` passes score_scales() when the caller has them already."""
        c, n = scales if scales is not None else self.score_scales()
        theta_x, theta_h = self.thresholds()
        return torch.exp(theta_x.detach().float()) / c, torch.exp(theta_h.detach().float()) / n

    def _mask(self, v: torch.Tensor, threshold: torch.Tensor, scale: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask in v's dtype, hard bool mask) for values v (T, n): hard forward |v| > threshold; in training,
        d mask / d theta through a sigmoid of the log-score margin log(|v| * scale) - theta."""
        hard = v.detach().abs().float() > threshold
        mask = hard.to(v.dtype)
        if self.gate_mode == "sample" and torch.is_grad_enabled() and theta.requires_grad:
            log_score = torch.log(v.detach().abs().float() * scale + SCORE_EPS)
            soft = torch.sigmoid((log_score - theta) / SOFT_WIDTH)
            mask = mask + (soft - soft.detach()).to(v.dtype)
        return mask, hard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_mode == "dense":
            return (self.reference_mlp if self.reference_mlp is not None else self.mlp)(x)
        m = self.mlp
        lead = x.shape[:-1]
        x = x.reshape(-1, self.hidden)  # (T, d)
        c, n = self.score_scales()
        theta_x, theta_h = self.thresholds()
        tx, th = self.threshold_vectors((c, n))
        mx, kx = self._mask(x, tx, c, theta_x)
        xs = x * mx
        h = m.act_fn(m.gate_proj(xs)) * m.up_proj(xs)  # (T, F)
        mh, kh = self._mask(h, th, n, theta_h)
        if self.track_stats:
            with torch.no_grad():
                ratio = read_fraction(kx.float().sum(-1), kh.float().sum(-1), self.hidden, self.width).mean()
                scores = None
                if self.keep_scores:
                    # evenly spaced tokens: deterministic (a resumed run projects exactly as an uninterrupted one)
                    rows = torch.linspace(0, len(x) - 1, min(self.score_samples, len(x)), device=x.device).long()
                    scores = (torch.log(x[rows].abs().float() * c + SCORE_EPS).flatten(),
                              torch.log(h[rows].abs().float() * n + SCORE_EPS).flatten())
                self.last_stats = SelectStats(ratio=ratio, log_scores=scores)
                if self.keep_counts is not None:
                    self.keep_counts[0].add_(kx.sum(0))
                    self.keep_counts[1].add_(kh.sum(0))
                    self.keep_counts[2] += len(x)
        return m.down_proj(h * mh).view(*lead, -1)


def wrap_with_select(model: nn.Module) -> list[SelectFFN]:
    """Replace each decoder layer's FFN with a SelectFFN (in place) and return them."""
    layers = []
    for layer in decoder_layers(model):
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            if not hasattr(mlp, name):
                raise UnsupportedArchitectureError(f"FFN {type(mlp).__name__} has no {name}: not a gated FFN we can wrap")
        if isinstance(mlp, SelectFFN):
            raise ValueError("model is already wrapped with selector layers")
        layer.mlp = SelectFFN(mlp)
        layers.append(layer.mlp)
    return layers


def select_layers(model: nn.Module) -> list[SelectFFN]:
    """All SelectFFN layers of a wrapped model, in module order."""
    return [m for m in model.modules() if isinstance(m, SelectFFN)]


def _quantile_threshold(log_scores: torch.Tensor, keep: float) -> float:
    """The log threshold above which a fraction `keep` of log_scores lies."""
    flat = log_scores.flatten().float()
    n = flat.numel()
    kept = int(round(keep * n))
    if kept >= n:
        return float(flat.min()) - 1.0
    if kept <= 0:
        return float(flat.max())
    return float(flat.kthvalue(n - kept).values)


@torch.no_grad()
def init_thresholds(model: nn.Module, layers: list[SelectFFN], seqs: torch.Tensor, target: float) -> list[dict]:
    """Set every layer's thresholds to keep `initial_split(target)` of its channels and neurons on seqs (S, L).

    All windows go through the model in one call, and the layers are fitted in order on the already
    sparsified model (each sees the inputs it will get), so the model reads about `target` of its FFNs
    on these tokens. Returns per-layer records.
    """
    if not 0.0 < target < 1.0:
        raise ConfigError(f"target must be in (0, 1), got {target}")
    fx, fh = initial_split(target)
    device = next(model.parameters()).device
    base = getattr(model, "model", model)
    records: list[dict] = []
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda mod, args, i=i: _fit_layer(layers[i], args[0], fx, fh, records)))
    before = [m.gate_mode for m in layers]
    try:
        for m in layers:
            m.gate_mode = "deterministic"
        base(input_ids=seqs.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        for m, b in zip(layers, before):
            m.gate_mode = b
    return records


def _fit_layer(layer: SelectFFN, x: torch.Tensor, fx: float, fh: float, records: list[dict]) -> None:
    m = layer.mlp
    x = x.reshape(-1, layer.hidden)
    c, n = layer.score_scales()
    lx = torch.log(x.abs().float() * c + SCORE_EPS)
    layer.theta_x.fill_(_quantile_threshold(lx, fx))
    xs = x * (lx > layer.theta_x)
    h = m.act_fn(m.gate_proj(xs)) * m.up_proj(xs)
    layer.theta_h.fill_(_quantile_threshold(torch.log(h.abs().float() * n + SCORE_EPS), fh))
    records.append({"x_kept": fx, "h_kept": fh, "theta_x": float(layer.theta_x), "theta_h": float(layer.theta_h)})


def ratio_at(layers: list[SelectFFN], scores: list[tuple[torch.Tensor, torch.Tensor]], offset: float) -> float:
    """Mean read fraction over layers of the sampled log-scores if every threshold moved by offset."""
    return _RatioCurve(layers, scores)(offset)


class _RatioCurve:
    """The read of sampled log-scores as a function of one offset on every threshold: the scores are
    sorted once (per layer, in units of the layer's own threshold), then each evaluation is two binary
    searches per layer."""

    def __init__(self, layers: list[SelectFFN], scores: list[tuple[torch.Tensor, torch.Tensor]]):
        self.parts = []
        for m, (lx, lh) in zip(layers, scores):
            tx, th = (float(t.detach()) for t in m.thresholds())
            self.parts.append(((lx.float().flatten() - tx).sort().values, (lh.float().flatten() - th).sort().values))

    def __call__(self, offset: float) -> float:
        total = 0.0
        c = torch.tensor([offset])
        for sx, sh in self.parts:
            fx = 1.0 - float(torch.searchsorted(sx, c, right=True)) / max(len(sx), 1)  # share of scores > offset
            fh = 1.0 - float(torch.searchsorted(sh, c, right=True)) / max(len(sh), 1)
            total += (2.0 * fx + fh) / 3.0
        return total / max(len(self.parts), 1)


def solve_select_offset(layers: list[SelectFFN], scores: list[tuple[torch.Tensor, torch.Tensor]], target: float, iters: int = 48) -> float:
    """The offset c (added to every threshold) whose read of the sampled log-scores is `target` (bisection)."""
    curve = _RatioCurve(layers, scores)
    lo, hi = -64.0, 64.0  # the read falls as c rises
    for _ in range(iters):
        mid = (lo + hi) / 2
        if curve(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def step_offset(layers: list[SelectFFN], target: float) -> float:
    """The offset that puts the last step's sampled tokens on `target` (the layers kept their log-scores)."""
    scores = [m.last_stats.log_scores if m.last_stats is not None else None for m in layers]
    if any(s is None for s in scores):
        raise RuntimeError("the projection needs each layer's log-scores (run the step with keep_scores on)")
    return solve_select_offset(layers, scores, target)


@torch.no_grad()
def shift_thresholds(layers: list[SelectFFN], offset: float) -> None:
    """Add offset to both thresholds of every layer (the projection after a step)."""
    for m in layers:
        m.theta_x.add_(offset)
        m.theta_h.add_(offset)


@torch.no_grad()
def threshold_step(layers: list[SelectFFN], lr: float) -> None:
    """One normalised gradient step on the thresholds: each moves by lr times its gradient over the mean |gradient|.

    Normalised over all layers together, not per threshold (as Adam would): the size of a layer's
    gradient against the others' is the signal that moves budget between layers.
    """
    params = [p for m in layers for p in (m.theta_x, m.theta_h)]
    grads = torch.stack([p.grad.float() if p.grad is not None else torch.zeros((), device=p.device) for p in params])
    scale = grads.abs().mean()
    if not torch.isfinite(scale) or scale <= 0:
        return
    for p, g in zip(params, grads):
        p.sub_(lr * g / scale)


# -- matching a target with fixed thresholds (learn's final evaluation, freeze) ---------------------------
# Tokens per forward call whose log-scores are kept while fitting the offset (sampled): enough for a
# ratio whose standard error is far below the ratio rule's tolerance.
FIT_SAMPLES = 256


@torch.no_grad()
def _scores_and_ratio(model, seqs: torch.Tensor, batch_size: int, samples: int) -> tuple[list, float, list[float]]:
    """Run seqs with the current thresholds: (per layer sampled (x, h) log-scores, measured ratio, per layer)."""
    from momcompress.learn.mom import gate_mode, tracking

    layers = select_layers(model)
    device = next(model.parameters()).device
    kept: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layers]
    per_layer = torch.zeros(len(layers), dtype=torch.float64)
    n = 0
    for m in layers:
        m.keep_scores, m.score_samples = True, samples
    try:
        with gate_mode(model, "deterministic"), tracking(model):
            for start in range(0, len(seqs), batch_size):
                batch = seqs[start : start + batch_size].to(device)
                model(input_ids=batch, use_cache=False)
                for i, m in enumerate(layers):
                    kept[i].append(m.last_stats.log_scores)
                    per_layer[i] += float(m.last_stats.ratio) * batch.numel()
                n += batch.numel()
    finally:
        for m in layers:
            m.keep_scores, m.score_samples = False, PROJECTION_TOKENS
    scores = [(torch.cat([x for x, _ in k]).cpu(), torch.cat([h for _, h in k]).cpu()) for k in kept]
    per_layer /= max(n, 1)
    return scores, float(per_layer.mean()), per_layer.tolist()


def measure_select_ratio(model, seqs: torch.Tensor, batch_size: int) -> tuple[float, list[float]]:
    """Measured read fraction (selector's own reads excluded) over seqs: (mean, per layer)."""
    _, ratio, per_layer = _scores_and_ratio(model, seqs, batch_size, samples=1)
    return ratio, per_layer


def set_offset(model, offset: float) -> None:
    """Every selector layer reads with its thresholds moved by offset (0 restores the learned ones)."""
    for m in select_layers(model):
        m.offset = float(offset)


@torch.no_grad()
def match_select_target(model, seqs: torch.Tensor, target: float, batch_size: int, tol: float = 0.005, rounds: int = 4) -> tuple[float, float]:
    """One offset for every threshold whose measured read on seqs is within tol of target: (offset, ratio).

    Each round runs the model once (keeping sampled log-scores), bisects the offset on those scores
    (the upstream layers' choices held fixed), then measures again, since a layer's inputs move with
    the layers before it. Returns the closest found when no offset meets tol. Leaves the offset set.
    """
    layers = select_layers(model)
    set_offset(model, 0.0)
    scores, ratio, _ = _scores_and_ratio(model, seqs, batch_size, FIT_SAMPLES)
    best = (0.0, ratio)
    offset = 0.0
    for _ in range(rounds):
        if abs(best[1] - target) <= tol:
            break
        # ratio_at reads each layer's current thresholds (offset included): solve for the extra shift.
        offset += solve_select_offset(layers, scores, target)
        set_offset(model, offset)
        scores, ratio, _ = _scores_and_ratio(model, seqs, batch_size, FIT_SAMPLES)
        if abs(ratio - target) < abs(best[1] - target):
            best = (offset, ratio)
    set_offset(model, best[0])
    return best
