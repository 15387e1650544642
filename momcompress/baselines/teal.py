"""TEAL-style training-free activation sparsity: the `teal` baseline (DESIGN.md, "Validation").

TEAL (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models") zeroes the
low-magnitude entries of each projection's *input*, so the matching weight columns need not be read:
    x entering gate/up:  keep channel j of token t when |x_tj| > tx  -> reads W_gate[:, j], W_up[:, j]
    h entering down:     keep neuron i of token t when |h_ti| > th   -> reads W_down[:, i]
with h = act(W_gate x_s) * (W_up x_s) computed from the thresholded x_s. Per token the FFN reads
    2 F d (kept x channels / d) + F d (kept neurons / F)   of its 3 F d parameters,
which is what `TealFFN.last_ratio` reports. Thresholding only h cannot go below 2/3.

One scalar threshold per layer and input (as TEAL), calibrated on calibration tokens by magnitude
quantiles so that the mean fraction read meets the target. The split between the two inputs is
chosen per layer (split="search"): among kept fractions (fx, fh) with (2 fx + fh) / 3 = target, the
one with the smallest relative error of the layer's FFN output on a sample of calibration tokens, as TEAL's
greedy allocation minimises output error at a fixed budget; split="equal" keeps fx = fh = target
(TEAL's uniform setting). Calibration runs the layers in order on the already-sparsified model, so
every layer's thresholds see the inputs they will get at inference.

The runtime here is masked dense math (exact, any device); the speed-up needs TEAL's sparse kernels.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from momcompress.errors import ConfigError
from momcompress.runtime.mom_ffn import ACTIVATIONS

SPLITS = ("search", "equal")
# Kept fraction of x tried per layer by split="search" (evenly spaced over the feasible range).
SEARCH_POINTS = 9
# Tokens of the calibration set on which the split search measures the output error.
SEARCH_TOKENS = 1024
KEEP_ALL = -1.0  # a threshold below every magnitude: nothing is zeroed


class TealFFN(nn.Module):
    """A gated FFN whose gate/up and down inputs are magnitude-thresholded (TEAL).

    Holds the dense weights under the dense FFN's names (gate_proj, up_proj, down_proj), so its state
    dict is the original FFN's; the two scalar thresholds live in the frozen config.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, dtype=torch.float32, device=None, projections=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        d, f = hidden_size, intermediate_size
        self.hidden_size, self.intermediate_size, self.activation = d, f, activation
        if projections is None:  # else (gate_proj, up_proj, down_proj) modules to hold, e.g. a dense FFN's
            projections = [nn.Linear(i, o, bias=False, dtype=dtype, device=device) for i, o in ((d, f), (d, f), (f, d))]
        self.gate_proj, self.up_proj, self.down_proj = projections
        self.register_buffer("x_threshold", torch.tensor(KEEP_ALL, device=device), persistent=False)  # () fp32, in the config
        self.register_buffer("h_threshold", torch.tensor(KEEP_ALL, device=device), persistent=False)  # () fp32, in the config
        self.track_stats = False
        self.last_ratio: torch.Tensor | None = None  # (T,) fraction of the FFN parameters each token read
        # Set by calibrate(): ("equal"/"search" request) to fit the thresholds on the next forward call.
        self._calibrate: tuple | None = None
        self.calibration: dict | None = None  # kept fractions and relative output error found by the fit

    @classmethod
    def from_mlp(cls, mlp: nn.Module, activation: str) -> "TealFFN":
        """A TealFFN sharing the weights of a dense gated FFN (thresholds keep everything until calibrated)."""
        w = mlp.gate_proj.weight  # (F, d)
        return cls(w.shape[1], w.shape[0], activation, device=w.device, projections=(mlp.gate_proj, mlp.up_proj, mlp.down_proj))

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, x_threshold={float(self.x_threshold):.4g}, h_threshold={float(self.h_threshold):.4g}"

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
        keep_x = x.abs() > tx  # (T, d)
        xs = x * keep_x
        h = ACTIVATIONS[self.activation](self.gate_proj(xs)) * self.up_proj(xs)  # (T, F)
        keep_h = h.abs() > th  # (T, F)
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
        self.calibration = {"x_kept": fx, "h_kept": fh, "relative_error": self._error(sample, ref, tx, th)}

    def _thresholds(self, x: torch.Tensor, fx: float, fh: float) -> tuple[float, float]:
        """Thresholds keeping fractions fx of |x| and fh of |h| over the tokens x (T, d)."""
        tx = magnitude_threshold(x, fx)
        xs = x * (x.abs() > tx)
        h = ACTIVATIONS[self.activation](self.gate_proj(xs)) * self.up_proj(xs)  # (T, F)
        return tx, magnitude_threshold(h, fh)

    def _error(self, x: torch.Tensor, ref: torch.Tensor, tx: float, th: float) -> float:
        """Relative error ||y - ref|| / ||ref|| of the thresholded FFN on x (T, d) against the dense output ref."""
        y, _, _ = self._sparse_forward(x, tx, th)
        return float((y - ref).float().norm() / ref.float().norm().clamp_min(1e-12))


def read_fraction(fx: torch.Tensor | float, fh: torch.Tensor | float):
    """Fraction of a gated FFN's 3 F d parameters read when fx of the d inputs and fh of the F neurons are kept."""
    return (2 * fx + fh) / 3


def split_fh(fx: float, target: float) -> float:
    """Kept neuron fraction fh that, with kept input fraction fx, reads `target` of the FFN."""
    return min(1.0, max(0.0, 3 * target - 2 * fx))


def feasible_fx(target: float, points: int = SEARCH_POINTS) -> list[float]:
    """Kept input fractions fx in [0, 1] for which some fh in [0, 1] meets the target (endpoints excluded)."""
    lo, hi = max(0.0, (3 * target - 1) / 2), min(1.0, 1.5 * target)
    return [lo + (hi - lo) * (i + 1) / (points + 1) for i in range(points)]


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


@torch.no_grad()
def calibrate(model, seqs: torch.Tensor, target: float, split: str = "search") -> list[dict]:
    """Replace the model's FFNs by TealFFN modules (in place) with thresholds calibrated on seqs (S, L).

    All windows go through the model in one call, layer by layer: each layer fits its thresholds on
    the inputs it gets from the already-sparsified layers before it. Returns per-layer records
    (thresholds, kept fractions, relative FFN output error on SEARCH_TOKENS of the calibration tokens).
    """
    from momcompress.modelio import detect_activation
    from momcompress.models import decoder_layers

    if split not in SPLITS:
        raise ConfigError(f"TEAL split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < target < 1.0:
        raise ConfigError(f"target must be in (0, 1), got {target}")
    layers = decoder_layers(model)
    activation = detect_activation(layers[0].mlp.act_fn)
    teal = []
    for layer in layers:
        layer.mlp = TealFFN.from_mlp(layer.mlp, activation)
        layer.mlp._calibrate = ("equal", target, target) if split == "equal" else ("search", target)
        teal.append(layer.mlp)
    device = next(model.parameters()).device
    bar = tqdm(total=len(teal), desc="teal calibrate", unit="layer", leave=False)
    hooks = [m.register_forward_hook(lambda *_: bar.update(1) and None) for m in teal]  # None: keep the output
    try:
        base = getattr(model, "model", model)  # skip the lm_head: its (tokens, vocab) logits are not needed
        base(input_ids=seqs.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    if any(m._calibrate is not None for m in teal):
        raise RuntimeError("a TEAL layer saw no calibration input: the model skipped an FFN")
    return [teal_record(m) for m in teal]


def teal_record(m: TealFFN) -> dict:
    """One layer's thresholds and calibration result (kept fractions, relative output error), as stored in the config."""
    return {"x_threshold": float(m.x_threshold), "h_threshold": float(m.h_threshold), **(m.calibration or {})}


def teal_layers(model: nn.Module) -> list[TealFFN]:
    """All TealFFN layers of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, TealFFN)]
