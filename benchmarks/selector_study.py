"""Which per-token neuron choice keeps quality at a given fraction of the FFN read? (issue 20, the study)

Every row is evaluated on the same held-out tokens (the first --tokens of learn's held-out windows, the
default data's Wikipedia paragraphs) with the original weights unless it says otherwise, and every row's
read counts what its selector itself reads (router, predictor, thresholds). Rows whose selection depends
on data fit it on learn's calibration windows (never on the held-out ones); thresholds are fitted layer
by layer on the already-sparsified model, as TEAL does.

Rows (K per bank = exactly K neurons in each bank of 64 consecutive neurons: static shapes):
- oracle: each token keeps its top fraction of neurons by |h_i| * ||W_down[:, i]|| computed exactly
  (reads the whole gate and up to know h: not a real selector, the ceiling of neuron choice);
- oracle-bank64: the same, exactly K per bank;
- teal: |x_j| and |h_i| thresholded per layer (momcompress.baselines.teal, default split);
- wina: WINA scores |x_j| * ||[W_gate; W_up][:, j]||, |h_i| * ||W_down[:, i]||, thresholded per layer
  at the per-token selector's initial split (the untrained `learn --selector activations`);
- wina-bank64: the same scores, exactly K per bank for channels and neurons (static shapes);
- two-stage: h estimated from the top fraction p of x's channels (WINA scores), then exactly K neurons
  per bank by |h_est| * ||W_down[:, i]||, computed exactly (their full gate / up rows and down columns);
- predictor: a rank-r bottleneck (d -> r -> F, trained per layer on cached calibration activations
  against the oracle's log scores), then K per bank by predicted score, computed exactly;
- experts: a `learn --selector experts` run's masks under its router (what freeze ships), with
  --experts-run RUN; experts-mix: the same run, scores = sum_e router_prob_e * log_alpha[e, i]
  (a per-token mixture of the masks), then K per bank, computed exactly;
- experts+teal: rows from the experts-mix choice, columns (x channels) from TEAL-style thresholds;
- learned: a `learn --selector activations` run (--learned-run RUN), thresholds fitted to the target.

    python benchmarks/selector_study.py --reads 0.5 --tokens 8192 --json study.json \
        [--experts-run RUN_E] [--learned-run RUN_A] [--rows oracle,teal,wina,...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from momcompress.hardware import cpu_name

ROWS = ("dense", "oracle", "oracle-bank64", "teal", "wina", "wina-bank64", "two-stage", "predictor",
        "experts", "experts-mix", "experts+teal", "learned")
BANK = 64
PREDICTOR_RANK = 64
PREDICTOR_STEPS = 400
TWO_STAGE_CHANNELS = 0.25  # p: fraction of x's channels read to estimate h


def bank_topk(score: torch.Tensor, keep: float, bank: int = BANK) -> torch.Tensor:
    """(T, N) bool: exactly round(keep * bank) entries of each bank of `bank` consecutive columns."""
    T, N = score.shape
    if N % bank:
        raise ValueError(f"{N} columns do not split into banks of {bank}")
    k = max(1, min(bank, round(keep * bank)))
    s = score.view(T, N // bank, bank)
    mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(k, dim=-1).indices, True)
    return mask.view(T, N)


def global_topk(score: torch.Tensor, keep: float) -> torch.Tensor:
    T, N = score.shape
    k = max(1, round(keep * N))
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(k, dim=-1).indices, True)


def quantile_threshold(values: torch.Tensor, keep: float) -> float:
    flat = values.flatten().float()
    n = flat.numel()
    kept = int(round(keep * n))
    if kept >= n:
        return -1.0
    return float(flat.kthvalue(max(1, n - kept)).values)


class StudyFFN(nn.Module):
    """One layer's FFN under a selector: forward(x) = select(self, x) -> (output (T, d), read (T,))."""

    def __init__(self, mlp: nn.Module, select, state: dict | None = None):
        super().__init__()
        self.mlp, self.select, self.state = mlp, select, state or {}
        w = mlp.gate_proj.weight
        self.d, self.f = w.shape[1], w.shape[0]
        self.cn = (mlp.gate_proj.weight.float().pow(2).sum(0) + mlp.up_proj.weight.float().pow(2).sum(0)).sqrt()  # (d,)
        self.dn = mlp.down_proj.weight.float().norm(dim=0)  # (F,)
        self.read_sum, self.tokens = 0.0, 0

    def h(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        return m.act_fn(m.gate_proj(x)) * m.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.d)
        y, read = self.select(self, xf)
        self.read_sum += float(read.sum())
        self.tokens += len(xf)
        return y.view(*lead, self.d)


# -- selectors: (layer, x (T, d)) -> (y (T, d), read (T,) fraction of the FFN incl. the selector's own) -----
def oracle(keep: float, bank: bool):
    def select(layer, x):
        h = layer.h(x)
        score = h.abs().float() * layer.dn
        mask = bank_topk(score, keep) if bank else global_topk(score, keep)
        return layer.mlp.down_proj(h * mask), mask.float().mean(-1)
    return select


def thresholds(fx: float, fh: float, wina: bool, bank: bool = False):
    """WINA (or TEAL when wina is False) thresholds fitted on the first call (calibration), or K per bank."""
    def select(layer, x):
        m, st = layer.mlp, layer.state
        sx = x.abs().float() * (layer.cn if wina else 1.0)
        if bank:
            kx = bank_topk(sx, fx)
        else:
            if "tx" not in st:
                st["tx"] = quantile_threshold(sx, fx)
            kx = sx > st["tx"]
        xs = x * kx
        h = m.act_fn(m.gate_proj(xs)) * m.up_proj(xs)
        sh = h.abs().float() * (layer.dn if wina else 1.0)
        if bank:
            kh = bank_topk(sh, fh)
        else:
            if "th" not in st:
                st["th"] = quantile_threshold(sh, fh)
            kh = sh > st["th"]
        read = (2 * kx.float().mean(-1) + kh.float().mean(-1)) / 3 + (layer.d + layer.f) / (3 * layer.d * layer.f) * wina
        return m.down_proj(h * kh), read
    return select


def two_stage(p: float, q: float):
    def select(layer, x):
        m = layer.mlp
        kx = bank_topk(x.abs().float() * layer.cn, p) if layer.d % BANK == 0 else global_topk(x.abs().float() * layer.cn, p)
        xs = x * kx
        est = (m.act_fn(m.gate_proj(xs)) * m.up_proj(xs)).abs().float() * layer.dn
        keep = bank_topk(est, q)
        y = m.down_proj(layer.h(x) * keep)
        # stage 1 reads p of the gate / up columns; stage 2 the kept neurons' whole gate / up rows and down columns
        return y, 2 * p / 3 + keep.float().mean(-1) + (layer.d + layer.f) / (3 * layer.d * layer.f)
    return select


def predicted(q: float):
    def select(layer, x):
        pred = layer.state["predictor"](x.float())  # (T, F) predicted log scores
        keep = bank_topk(pred, q)
        y = layer.mlp.down_proj(layer.h(x) * keep)
        r = layer.state["rank"]
        return y, keep.float().mean(-1) + r * (layer.d + layer.f) / (3 * layer.d * layer.f)
    return select


def experts_mix(q: float, columns: float | None = None):
    def select(layer, x):
        st = layer.state
        probs = torch.softmax(x.float() @ st["router"].T, dim=-1)  # (T, E)
        score = probs @ st["log_alpha"]  # (T, F) mixture of the mask logits
        keep = bank_topk(score, q)
        router = st["router"].numel() / (3 * layer.d * layer.f)
        if columns is None:
            return layer.mlp.down_proj(layer.h(x) * keep), keep.float().mean(-1) + router
        m = layer.mlp
        if "tx" not in st:
            st["tx"] = quantile_threshold(x.abs().float(), columns)
        kx = x.abs().float() > st["tx"]
        xs = x * kx
        h = (m.act_fn(m.gate_proj(xs)) * m.up_proj(xs)) * keep
        read = keep.float().mean(-1) * (2 * kx.float().mean(-1) + 1) / 3 + router
        return m.down_proj(h), read
    return select


# -- driving a model ---------------------------------------------------------------------------------------
def install(model, make_layer):
    from momcompress.models import decoder_layers

    originals = [layer.mlp for layer in decoder_layers(model)]
    for i, layer in enumerate(decoder_layers(model)):
        layer.mlp = make_layer(i, originals[i])
    return originals


def restore(model, originals):
    from momcompress.models import decoder_layers

    for layer, mlp in zip(decoder_layers(model), originals):
        layer.mlp = mlp


def evaluate(model, calib, held, batch: int = 8) -> tuple[float, float]:
    """Fit on calib (one pass, layers in order), then (read, perplexity) on held."""
    from momcompress.metrics import perplexity
    from momcompress.models import decoder_layers

    with torch.no_grad():
        model.model(input_ids=calib, use_cache=False)
    layers = [layer.mlp for layer in decoder_layers(model)]
    for m in layers:
        m.read_sum, m.tokens = 0.0, 0
    ppl = perplexity(model, held, batch)
    read = sum(m.read_sum / max(m.tokens, 1) for m in layers) / len(layers)
    return read, ppl


@torch.no_grad()
def ffn_inputs(model, seqs) -> list[torch.Tensor]:
    from momcompress.models import decoder_layers

    xs = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda mod, args: xs.append(args[0].reshape(-1, args[0].shape[-1]).float()))
             for layer in decoder_layers(model)]
    try:
        model.model(input_ids=seqs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return xs


def train_predictor(mlp, x: torch.Tensor, rank: int, steps: int, seed: int = 0) -> nn.Module:
    """A d -> rank -> F bottleneck trained on x (n, d) to predict log(|h| * ||W_down col||), standardised per neuron."""
    torch.manual_seed(seed)
    with torch.no_grad():
        h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        target = torch.log(h.abs() * mlp.down_proj.weight.norm(dim=0) + 1e-12)
        mu, sd = target.mean(0), target.std(0).clamp_min(1e-6)
        target = (target - mu) / sd
    net = nn.Sequential(nn.Linear(x.shape[1], rank, bias=False), nn.Linear(rank, target.shape[1]))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    with torch.enable_grad():
        for step in range(steps):
            idx = torch.randint(0, len(x), (1024,))
            loss = F.mse_loss(net(x[idx]), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.requires_grad_(False)
    # ranking within a token is what matters: undo the per-neuron standardisation
    return nn.Sequential(net, _Affine(sd, mu))


class _Affine(nn.Module):
    def __init__(self, scale, shift):
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, t):
        return t * self.scale + self.shift


def run_row(name: str, read: float, model, tok, calib, held, args) -> dict:
    """Evaluate one row at the target read; returns the table row."""
    from momcompress.learn.selector import initial_split

    t0 = time.time()
    fx, fh = initial_split(read)
    note = ""
    if name == "dense":
        from momcompress.metrics import perplexity

        return {"row": name, "target": read, "read": 1.0, "ppl": perplexity(model, held, 8), "seconds": time.time() - t0, "note": ""}
    if name == "teal":
        return _teal_row(read, model, calib, held, t0)
    if name == "learned":
        return _learned_row(read, args, held, t0)
    if name == "experts":
        return _experts_row(read, args, held, t0)
    state_for = lambda i: {}  # noqa: E731
    if name.startswith("oracle"):
        select = oracle(read, bank=name.endswith("bank64"))
        note = "exact h for every neuron (reads all of gate and up): a ceiling, not a selector"
    elif name == "wina":
        select = thresholds(fx, fh, wina=True)
        note = f"thresholds fitted to keep {fx:.2f} of x, {fh:.2f} of h on calibration tokens"
    elif name == "wina-bank64":
        select = thresholds(fx, fh, wina=True, bank=True)
        note = f"{round(fx * BANK)} of {BANK} channels and {round(fh * BANK)} of {BANK} neurons per bank"
    elif name == "two-stage":
        p = TWO_STAGE_CHANNELS
        q = max(1.0 / BANK, read - 2 * p / 3 - 1e-3)
        select = two_stage(p, q)
        note = f"h estimated from {p:.2f} of x's channels, then {round(q * BANK)} of {BANK} neurons per bank computed exactly"
    elif name == "predictor":
        r = args.predictor_rank
        own = r * (model.config.hidden_size + model.config.intermediate_size) / (3 * model.config.hidden_size * model.config.intermediate_size)
        q = read - own
        if q <= 0:
            raise SystemExit(f"the rank-{r} predictor alone reads {own:.3f} > {read}")
        xs = ffn_inputs(model, calib)
        from momcompress.models import decoder_layers

        preds = [train_predictor(layer.mlp, x, r, args.predictor_steps) for layer, x in zip(decoder_layers(model), xs)]
        state_for = lambda i: {"predictor": preds[i], "rank": r}  # noqa: E731
        select = predicted(q)
        note = f"rank {r} bottleneck, {args.predictor_steps} Adam steps per layer on {len(xs[0])} cached calibration tokens; {round(q * BANK)} of {BANK} neurons per bank"
    elif name in ("experts-mix", "experts+teal"):
        if not args.experts_run:
            raise SystemExit(f"row {name} needs --experts-run RUN (a `learn --selector experts` run)")
        masks = _run_masks(args.experts_run)
        columns = None
        q = read - masks["router"].shape[1] / (3 * model.config.intermediate_size)
        if name == "experts+teal":
            columns = min(1.0, read + 0.15)  # rows then read a little over half their gate / up columns
            q = (read - masks["router"].shape[1] / (3 * model.config.intermediate_size)) * 3 / (2 * columns + 1)
            note = f"{round(q * BANK)} of {BANK} neurons per bank from the mixture, x channels thresholded to keep {columns:.2f}"
        else:
            note = f"{round(q * BANK)} of {BANK} neurons per bank by sum_e p_e log_alpha[e, i]"
        state_for = lambda i: {"router": masks["router"][i], "log_alpha": masks["log_alpha"][i]}  # noqa: E731
        select = experts_mix(q, columns)
    else:
        raise SystemExit(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
    originals = install(model, lambda i, mlp: StudyFFN(mlp, select, state_for(i)))
    try:
        got, ppl = evaluate(model, calib, held)
    finally:
        restore(model, originals)
    return {"row": name, "target": read, "read": got, "ppl": ppl, "seconds": time.time() - t0, "note": note}


def _run_masks(run: str) -> dict:
    from safetensors.torch import load_file

    masks = load_file(Path(run) / "masks.safetensors")
    if "log_alpha" not in masks:
        raise SystemExit(f"{run} is not an expert-mask run (learn --selector experts)")
    la = masks["log_alpha"]  # (L, E, N)
    if "neuron_perm" in masks:  # blocks are over the run's neuron order: back to the checkpoint's
        perm = masks["neuron_perm"]
        inv = torch.argsort(perm, dim=1)
        la = torch.stack([la[i][:, inv[i]] for i in range(len(la))])
    return {"log_alpha": la, "router": masks["router"]}


def _teal_row(read, model, calib, held, t0) -> dict:
    import copy

    from momcompress.baselines.teal import calibrate, teal_layers

    from momcompress.baselines.base import measure_ratio

    m = copy.deepcopy(model)
    calibrate(m, calib, read)
    ratio, _, ppl = measure_ratio(m, held, 8)
    kept = teal_layers(m)[0].calibration
    return {"row": "teal", "target": read, "read": ratio, "ppl": ppl, "seconds": time.time() - t0,
            "note": f"momcompress.baselines.teal (layer 0 keeps {kept['x_kept']:.2f} of x, {kept['h_kept']:.2f} of h)"}


def _experts_row(read, args, held, t0) -> dict:
    from momcompress.freeze.freezer import load_learned, read_run, resolve_source
    from momcompress.learn.select import match_target, matched_gates, measure_ratio
    from momcompress.metrics import perplexity

    if not args.experts_run:
        raise SystemExit("row experts needs --experts-run RUN")
    run = read_run(args.experts_run)
    model, _, _ = load_learned(run, resolve_source(run), torch.device("cpu"))
    model.eval()
    calib = _windows(args)[0]
    offset, _ = match_target(model, calib, read, 8)
    ratio, _ = measure_ratio(model, held, 8, offset)
    with matched_gates(model, offset):
        ppl = perplexity(model, held, 8)
    router = run.router.shape[1] / (3 * run.log_alpha.shape[2] * run.manifest["block_size"])
    return {"row": "experts", "target": read, "read": ratio + router, "ppl": ppl, "seconds": time.time() - t0,
            "note": f"{run.config.experts} experts top-{run.config.top_k} under the learned router, gates matched on calibration tokens"}


def _learned_row(read, args, held, t0) -> dict:
    from momcompress.freeze.freezer import load_learned_selector, read_run, resolve_source
    from momcompress.learn.selector import match_select_target, measure_select_ratio, selector_read, set_offset
    from momcompress.metrics import perplexity

    if not args.learned_run:
        raise SystemExit("row learned needs --learned-run RUN (a `learn --selector activations` run)")
    run = read_run(args.learned_run)
    model, _, _ = load_learned_selector(run, resolve_source(run), torch.device("cpu"))
    model.eval()
    calib = _windows(args)[0]
    match_select_target(model, calib, read, 8)
    ratio, _ = measure_select_ratio(model, held, 8)
    ppl = perplexity(model, held, 8)
    set_offset(model, 0.0)
    own = selector_read(model.config.hidden_size, model.config.intermediate_size)
    cfg = run.config
    return {"row": "learned", "target": read, "read": ratio + own, "ppl": ppl, "seconds": time.time() - t0,
            "note": f"learn --selector activations, {cfg.steps} steps x {cfg.tokens_per_step} tokens (trained at {cfg.target})"}


def _windows(args):
    from momcompress.config import LearnConfig
    from momcompress.learn.trainer import learning_data
    from momcompress.models import load_model, resolve_model_dir

    _, tok = load_model(resolve_model_dir(args.model))
    train, held = learning_data(LearnConfig(), tok)
    n_held = max(1, args.tokens // held.shape[1])
    n_cal = max(1, args.calibration_tokens // train.shape[1])
    return train[:n_cal], held[:n_held]


def format_table(rows: list[dict], dense_ppl: float) -> str:
    lines = ["| row | target | read (selector incl.) | perplexity | x dense | s | how |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['target']:.2f} | {r['read']:.3f} | {r['ppl']:.2f} | {r['ppl'] / dense_ppl:.2f} | "
                     f"{r['seconds']:.0f} | {r['note']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--reads", default="0.5", help="comma-separated target reads (fractions of the FFN)")
    ap.add_argument("--rows", default="dense,oracle,oracle-bank64,teal,wina,wina-bank64,two-stage,predictor",
                    help=f"comma-separated rows of {', '.join(ROWS)}")
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens (learn's held-out windows)")
    ap.add_argument("--calibration-tokens", type=int, default=16384)
    ap.add_argument("--experts-run", help="a `learn --selector experts` run (rows experts, experts-mix, experts+teal)")
    ap.add_argument("--learned-run", help="a `learn --selector activations` run (row learned)")
    ap.add_argument("--predictor-rank", type=int, default=PREDICTOR_RANK)
    ap.add_argument("--predictor-steps", type=int, default=PREDICTOR_STEPS)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from momcompress.models import load_model, resolve_model_dir

    model, tok = load_model(resolve_model_dir(args.model))
    calib, held = _windows(args)
    print(f"# selector study: {held.numel()} held-out tokens, {calib.numel()} calibration tokens; {cpu_name()}", file=sys.stderr)
    rows = []
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    for read in (float(r) for r in args.reads.split(",")):
        for name in names:
            if name == "dense" and rows and any(r["row"] == "dense" for r in rows):
                continue
            row = run_row(name, read, model, tok, calib, held, args)
            rows.append(row)
            print(f"{row['row']:>14} target {read:.2f}: read {row['read']:.3f}, perplexity {row['ppl']:.2f} ({row['seconds']:.0f} s)",
                  file=sys.stderr, flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "tokens": int(held.numel()), "rows": rows}, indent=2))
    dense = next((r["ppl"] for r in rows if r["row"] == "dense"), math.nan)
    print(format_table(rows, dense))
    return 0


if __name__ == "__main__":
    sys.exit(main())
