"""Training-free activation sparsity: the `teal` and `wina` baselines (DESIGN.md, "Validation").

Both zero the low-scoring entries of each FFN projection's *input*, so the matching weight columns
need not be read:
    x entering gate/up:  keep channel j of token t when score(x_tj) > tx  -> reads W_gate[:, j], W_up[:, j]
    h entering down:     keep neuron i of token t when score(h_ti) > th   -> reads W_down[:, i]
with h = act(W_gate x_s) * (W_up x_s) computed from the thresholded x_s. Per token the FFN reads
    2 F d (kept x channels / d) + F d (kept neurons / F)   of its 3 F d parameters,
which is what `TealFFN.last_ratio` reports. Thresholding only h cannot go below 2/3.

The two methods differ only in the score, |v_j| times a per-entry scale s_j:
- teal (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models"): s_j = 1;
- wina (Chen et al. 2025, "WINA: Weight Informed Neuron Activation", arXiv 2505.19427): s_j = the
  norm of the weight column entry j multiplies, so an entry counts by how much it can move the
  output. Gate and up share their input x, so x_j scales by ||[W_gate; W_up][:, j]||_2 (one mask for
  both, as a fused kernel reads them); h_i by ||W_down[:, i]||_2.
The scales are recomputed from the weights whenever a layer is built or loaded, so a folder holds
only the dense weights and two thresholds per layer. At run time |v_j| s_j > t is evaluated as
|v_j| > t / s_j: a per-entry cut, no per-token multiply.

One scalar threshold per layer and input (as TEAL), calibrated on calibration tokens by score
quantiles so that the mean fraction read meets the target. How the budget is split between the two
inputs (kept fractions fx of x, fh of h, with (2 fx + fh) / 3 = target):
- split="global" (default): one (fx, fh) for every layer, the grid point (fx in steps of
  GLOBAL_STEP, plus the equal split) whose thresholds, fitted on GLOBAL_TOKENS calibration tokens,
  give the smallest mean KL divergence of the next-token distribution to the dense model's on those
  tokens; the chosen split is then fitted on all calibration tokens;
- split="search": per layer, the grid point with the smallest error of that layer's FFN output on
  SEARCH_TOKENS calibration tokens, each token's squared error relative to its own output norm and
  averaged over tokens (TEAL's greedy per-layer allocation, with an error no single token dominates);
- split="equal": fx = fh = target (TEAL's uniform setting);
- split="fixed": the given fx for every layer.
Calibration runs the layers in order on the already-sparsified model, so every layer's thresholds
see the inputs they will get at inference.

The runtime here is masked dense math (exact, any device); the speed-up needs sparse kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from momcompress.errors import ConfigError
from momcompress.runtime.mom_ffn import ACTIVATIONS

SCORES = ("teal", "wina")  # the baselines built on TealFFN: per-entry score scale 1, or the weight column norm
SPLITS = ("global", "search", "equal", "fixed")
DEFAULT_SPLIT = "global"
# Kept fraction of x tried per layer by split="search" (evenly spaced over the feasible range).
SEARCH_POINTS = 9
# Tokens of the calibration set on which the split search measures the output error.
SEARCH_TOKENS = 1024
# split="global": the grid step of fx, and the calibration tokens each grid point is fitted and scored on.
GLOBAL_STEP = 0.05
GLOBAL_TOKENS = 4096
KEEP_ALL = -1.0  # a threshold below every score: nothing is zeroed


class TealFFN(nn.Module):
    """A gated FFN whose gate/up and down inputs are score-thresholded (TEAL, or WINA with score="wina").

    Holds the dense weights under the dense FFN's names (gate_proj, up_proj, down_proj), so its state
    dict is the original FFN's; the two scalar thresholds live in the frozen config, the per-entry
    score scales are recomputed from the weights (`refresh_scales`).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, dtype=torch.float32, device=None, projections=None,
                 score: str = "teal"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        d, f = hidden_size, intermediate_size
        self.hidden_size, self.intermediate_size, self.activation, self.score = d, f, activation, score
        if projections is None:  # else (gate_proj, up_proj, down_proj) modules to hold, e.g. a dense FFN's
            projections = [nn.Linear(i, o, bias=False, dtype=dtype, device=device) for i, o in ((d, f), (d, f), (f, d))]
        self.gate_proj, self.up_proj, self.down_proj = projections
        self.register_buffer("x_threshold", torch.tensor(KEEP_ALL, device=device), persistent=False)  # () fp32, in the config
        self.register_buffer("h_threshold", torch.tensor(KEEP_ALL, device=device), persistent=False)  # () fp32, in the config
        self.register_buffer("x_scale", torch.ones(d, device=device), persistent=False)  # (d,) fp32, from the weights
        self.register_buffer("h_scale", torch.ones(f, device=device), persistent=False)  # (F,) fp32, from the weights
        self.refresh_scales()
        self.track_stats = False
        self.last_ratio: torch.Tensor | None = None  # (T,) fraction of the FFN parameters each token read
        # Set by calibrate(): ("fixed", fx, fh) or ("search", target) to fit the thresholds on the next forward call.
        self._calibrate: tuple | None = None
        self.calibration: dict | None = None  # kept fractions and output error found by the fit

    @classmethod
    def from_mlp(cls, mlp: nn.Module, activation: str, score: str = "teal") -> "TealFFN":
        """A TealFFN sharing the weights of a dense gated FFN (thresholds keep everything until calibrated)."""
        w = mlp.gate_proj.weight  # (F, d)
        return cls(w.shape[1], w.shape[0], activation, device=w.device, projections=(mlp.gate_proj, mlp.up_proj, mlp.down_proj),
                   score=score)

    @torch.no_grad()
    def refresh_scales(self) -> None:
        """Recompute the per-entry score scales from the current weights (after loading or moving them)."""
        xs, hs = score_scales(self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, self.score)
        self.x_scale = xs.to(self.x_scale.device)
        self.h_scale = hs.to(self.h_scale.device)

    def selector_params(self) -> int:
        """What choosing a token's entries reads besides the weights: WINA's per-entry scales (d + F; the
        run time compares |x_j| > t / s_j), TEAL's two scalar thresholds."""
        return self.hidden_size + self.intermediate_size if self.score == "wina" else 2

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, score={self.score}, "
                f"x_threshold={float(self.x_threshold):.4g}, h_threshold={float(self.h_threshold):.4g}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.hidden_size)  # (T, d)
        if self._calibrate is not None:
            self._fit(xf)
        y, kept_x, kept_h = self._sparse_forward(xf, self.x_threshold, self.h_threshold)
        if self.track_stats:
            self.last_ratio = read_fraction(kept_x.float() / self.hidden_size, kept_h.float() / self.intermediate_size)
        return y.view(*lead, self.hidden_size)

    def _sparse_forward(self, x: torch.Tensor, tx, th):
        """(T, d) -> (output (T, d), kept x channels (T,), kept neurons (T,))."""
        keep_x = x.abs() > tx / self.x_scale  # (T, d): |x_j| s_j > tx, as a per-channel cut
        xs = x * keep_x
        h = ACTIVATIONS[self.activation](self.gate_proj(xs)) * self.up_proj(xs)  # (T, F)
        keep_h = h.abs() > th / self.h_scale  # (T, F)
        return self.down_proj(h * keep_h), keep_x.sum(-1), keep_h.sum(-1)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The original FFN: (T, d) -> (T, d)."""
        return self.down_proj(ACTIVATIONS[self.activation](self.gate_proj(x)) * self.up_proj(x))

    @torch.no_grad()
    def _fit(self, x: torch.Tensor) -> None:
        """Set both thresholds from this call's inputs x (T, d) for the requested split, then stop calibrating."""
        request, self._calibrate = self._calibrate, None
        sample = x[:: max(1, len(x) // SEARCH_TOKENS)][:SEARCH_TOKENS]  # (S, d) where output errors are measured
        ref = self.dense_forward(sample)  # (S, d)
        if request[0] == "search":  # the split with the smallest output error on the sample
            target = request[1]
            candidates = sorted(set(feasible_fx(target)) | {target})  # the equal split is always a candidate
            fx = min(candidates, key=lambda f: self._error(sample, ref, *self._thresholds(sample, f, split_fh(f, target))))
            fh = split_fh(fx, target)
        else:
            fx, fh = request[1], request[2]
        tx, th = self._thresholds(x, fx, fh)
        self.x_threshold.fill_(tx)
        self.h_threshold.fill_(th)
        self.calibration = {"x_kept": fx, "h_kept": fh, "token_error": self._error(sample, ref, tx, th)}

    def _thresholds(self, x: torch.Tensor, fx: float, fh: float) -> tuple[float, float]:
        """Thresholds keeping fractions fx of the x scores and fh of the h scores over the tokens x (T, d)."""
        tx = magnitude_threshold(x.float() * self.x_scale, fx)
        xs = x * (x.abs() > tx / self.x_scale)
        h = ACTIVATIONS[self.activation](self.gate_proj(xs)) * self.up_proj(xs)  # (T, F)
        return tx, magnitude_threshold(h.float() * self.h_scale, fh)

    def _error(self, x: torch.Tensor, ref: torch.Tensor, tx: float, th: float) -> float:
        """Mean over tokens of ||y_t - ref_t||^2 / ||ref_t||^2: the thresholded FFN on x (T, d) against the dense output ref.

        Each token counts once. The pooled ||y - ref|| / ||ref|| that split="search" used before is dominated by
        the few tokens with massive FFN outputs (the first token of a window carries 50-100% of ||ref||^2 in 8 of
        SmolLM2-135M's 30 layers), and chose splits that suit them and hurt every other token (README, "baseline").
        """
        y, _, _ = self._sparse_forward(x, tx, th)
        err = (y - ref).float().pow(2).sum(-1)  # (T,)
        return float((err / ref.float().pow(2).sum(-1).clamp_min(1e-12)).mean())


def score_scales(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, score: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entry score scales (x (d,), h (F,)), fp32, of a gated FFN with weights w_gate, w_up (F, d) and w_down (d, F).

    teal: ones. wina: x_j -> ||[W_gate; W_up][:, j]||_2, the fused column x_j multiplies; h_i -> ||W_down[:, i]||_2.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    d, f = w_gate.shape[1], w_gate.shape[0]
    if score == "teal":
        return torch.ones(d, device=w_gate.device), torch.ones(f, device=w_gate.device)
    x_scale = (w_gate.float().pow(2).sum(0) + w_up.float().pow(2).sum(0)).sqrt()  # (d,)
    return x_scale, w_down.float().norm(dim=0)  # (d,), (F,)


def read_fraction(fx: torch.Tensor | float, fh: torch.Tensor | float):
    """Fraction of a gated FFN's 3 F d parameters read when fx of the d inputs and fh of the F neurons are kept."""
    return (2 * fx + fh) / 3


def split_fh(fx: float, target: float) -> float:
    """Kept neuron fraction fh that, with kept input fraction fx, reads `target` of the FFN."""
    return round(min(1.0, max(0.0, 3 * target - 2 * fx)), 12)  # rounded: 0.4, not 0.3999999999999999


def fx_range(target: float) -> tuple[float, float]:
    """The kept input fractions fx in [0, 1] for which some fh in [0, 1] meets the target: [lo, hi]."""
    return max(0.0, (3 * target - 1) / 2), min(1.0, 1.5 * target)


def feasible_fx(target: float, points: int = SEARCH_POINTS) -> list[float]:
    """Kept input fractions fx in [0, 1] for which some fh in [0, 1] meets the target (endpoints excluded)."""
    lo, hi = fx_range(target)
    return [lo + (hi - lo) * (i + 1) / (points + 1) for i in range(points)]


def global_grid(target: float, step: float = GLOBAL_STEP) -> list[float]:
    """split="global"'s candidates: the multiples of step strictly inside the feasible fx range, and the equal split."""
    lo, hi = fx_range(target)
    grid = {round(k * step, 10) for k in range(1, int(1 / step) + 1) if lo < k * step - 1e-9 and k * step + 1e-9 < hi}
    return sorted(grid | {target})


def check_fixed_fx(x_kept: float, target: float) -> None:
    """ConfigError unless (2 x_kept + fh) / 3 = target has a solution fh in [0, 1]."""
    lo, hi = fx_range(target)
    if not lo - 1e-9 <= x_kept <= hi + 1e-9:
        raise ConfigError(
            f"--x-kept {x_kept:g} cannot meet target {target:g}: with (2 fx + fh) / 3 = target and fh in [0, 1], "
            f"the kept input fraction fx must be in [{lo:.4g}, {hi:.4g}]; pass one in that range"
        )


def magnitude_threshold(values: torch.Tensor, keep: float) -> float:
    """Threshold t such that a fraction `keep` of the entries of `values` has |v| > t (ties aside)."""
    flat = values.detach().abs().flatten().float()
    n = flat.numel()
    kept = int(round(keep * n))
    if kept >= n:
        return KEEP_ALL
    if kept <= 0:
        return float(flat.max())
    return float(flat.kthvalue(n - kept).values)  # the (n - kept)-th smallest: exactly `kept` entries lie above


def selection_windows(seqs: torch.Tensor, tokens: int = GLOBAL_TOKENS) -> torch.Tensor:
    """Evenly spaced calibration windows (S', L) holding about `tokens` tokens (at least one window)."""
    n = max(1, min(len(seqs), tokens // seqs.shape[1]))
    return seqs[torch.linspace(0, len(seqs) - 1, n).round().long()]


def final_hidden(model, seqs: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states (S, L, d) for seqs (S, L), in one call (the lm_head is not run)."""
    device = next(model.parameters()).device
    base = getattr(model, "model", model)
    return base(input_ids=seqs.to(device), use_cache=False).last_hidden_state


def mean_kl(model, dense_h: torch.Tensor, sparse_h: torch.Tensor, chunk: int = 512) -> float:
    """Mean over tokens of KL(dense || sparse) of the next-token distributions whose last hidden states
    are dense_h and sparse_h (S, L, d): logits by the model's lm_head (and final soft-capping, as Gemma 2)."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    d = dense_h.reshape(-1, dense_h.shape[-1])
    s = sparse_h.reshape(-1, sparse_h.shape[-1])
    total = 0.0
    for i in range(0, len(d), chunk):
        logits = [head(h[i : i + chunk]).float() for h in (d, s)]  # 2 x (C, V)
        if cap:
            logits = [torch.tanh(z / cap) * cap for z in logits]
        p, q = (F.log_softmax(z, dim=-1) for z in logits)
        total += float((p.exp() * (p - q)).sum())
    return total / max(len(d), 1)


@torch.no_grad()
def calibrate(model, seqs: torch.Tensor, target: float, split: str = DEFAULT_SPLIT, score: str = "teal",
              x_kept: float | None = None) -> dict:
    """Replace the model's FFNs by TealFFN modules (in place) with thresholds calibrated on seqs (S, L).

    Each fit sends its windows through the model in one call, layer by layer: each layer fits its
    thresholds on the inputs it gets from the already-sparsified layers before it.

    Args:
        model: a causal LM with gated FFNs (changed in place).
        seqs: calibration windows (S, L).
        target: fraction of FFN parameters read per token, in (0, 1).
        split: "global", "search", "equal" or "fixed" (module docstring).
        score: "teal" or "wina".
        x_kept: the kept input fraction fx of split="fixed" (only there).

    Returns:
        {"split", "score", "layers": per-layer records (thresholds, kept fractions, the FFN output error
        of TealFFN._error on SEARCH_TOKENS of the calibration tokens), and for split="global" "selection": the grid
        with each point's mean KL to the dense model and the tokens it was measured on}.
    """
    from momcompress.modelio import detect_activation
    from momcompress.models import decoder_layers

    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {SPLITS}, got {split!r}")
    if score not in SCORES:
        raise ConfigError(f"score must be one of {SCORES}, got {score!r}")
    if not 0.0 < target < 1.0:
        raise ConfigError(f"target must be in (0, 1), got {target}")
    if (x_kept is not None) != (split == "fixed"):
        raise ConfigError("--x-kept goes with --split fixed (and --split fixed needs --x-kept): pass both or neither")
    if x_kept is not None:
        check_fixed_fx(x_kept, target)
    layers = decoder_layers(model)
    activation = detect_activation(layers[0].mlp.act_fn)
    # what each layer fits on all of seqs ("global" replaces it by the grid's best split below)
    chosen = {"search": ("search", target), "equal": ("fixed", target, target), "global": None}.get(split)
    if split == "fixed":
        chosen = ("fixed", x_kept, split_fh(x_kept, target))
    selection = None
    if split == "global":
        windows = selection_windows(seqs)
        dense_h = final_hidden(model, windows)  # (S', L, d), before any FFN is replaced
    sparse = []
    for layer in layers:
        layer.mlp = TealFFN.from_mlp(layer.mlp, activation, score)
        sparse.append(layer.mlp)
    if split == "global":
        grid = []
        for fx in tqdm(global_grid(target), desc=f"{score} global split", unit="split", leave=False):
            fh = split_fh(fx, target)
            sparse_h = _fit_all(model, sparse, windows, ("fixed", fx, fh), progress=False)  # fitted and run in one pass
            grid.append({"x_kept": fx, "h_kept": fh, "kl": mean_kl(model, dense_h, sparse_h)})
        best = min(grid, key=lambda g: g["kl"])
        chosen = ("fixed", best["x_kept"], best["h_kept"])
        selection = {"criterion": "mean KL(dense || sparse) of next-token distributions", "tokens": int(windows.numel()),
                     "grid": grid, "x_kept": best["x_kept"], "h_kept": best["h_kept"]}
    _fit_all(model, sparse, seqs, chosen)
    out = {"split": split, "score": score, "layers": [teal_record(m) for m in sparse]}
    if selection is not None:
        out["selection"] = selection
    return out


def _fit_all(model, sparse: list[TealFFN], seqs: torch.Tensor, request: tuple, progress: bool = True) -> torch.Tensor:
    """Fit every TealFFN of model to `request` on seqs (S, L) in one forward pass; return the last hidden states."""
    for m in sparse:
        m._calibrate = request
    bar = tqdm(total=len(sparse), desc=f"{sparse[0].score} calibrate", unit="layer", leave=False, disable=not progress)
    hooks = [m.register_forward_hook(lambda *_: bar.update(1) and None) for m in sparse]  # None: keep the output
    try:
        hidden = final_hidden(model, seqs)  # the lm_head is skipped: its (tokens, vocab) logits are not needed
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    if any(m._calibrate is not None for m in sparse):
        raise RuntimeError("a TEAL layer saw no calibration input: the model skipped an FFN")
    return hidden


def teal_record(m: TealFFN) -> dict:
    """One layer's thresholds and calibration result (kept fractions, output error), as stored in the config."""
    return {"x_threshold": float(m.x_threshold), "h_threshold": float(m.h_threshold), **(m.calibration or {})}


def teal_layers(model: nn.Module) -> list[TealFFN]:
    """All TealFFN layers of a model (TEAL or WINA), in module order."""
    return [m for m in model.modules() if isinstance(m, TealFFN)]
