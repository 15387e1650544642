"""TEAL and WINA under each split of the budget, at several targets: held-out perplexity and read ratio.

Every row is what `momcompress baseline METHOD MODEL --target T --split S` reports as its held-out
measurement (the same calibration tokens, thresholds and held-out windows: for the default data the
first --eval-tokens tokens of the Wikipedia paragraphs, which are also the first windows of learn's
held-out split), computed on one loaded model without writing a folder per row. The split is always
chosen on calibration tokens only; the held-out tokens are only measured.

    OMP_NUM_THREADS=1 python benchmarks/activation_sparsity.py --targets 0.3,0.5,0.7 --json runs/activation_sparsity.json

Rows already in --json are reused (an interrupted study resumes there); the table is printed after
every row. Only perplexities and ratios are compared, so a loaded machine changes the wall times only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def study_row(model, calib, heldout, method: str, split: str, target: float, batch_size: int, x_kept: float | None = None) -> dict:
    """Calibrate METHOD with SPLIT at TARGET on calib (S, L) in place, measure on heldout, then restore the dense FFNs."""
    from momcompress.baselines.base import measure_ratio
    from momcompress.baselines.teal import calibrate
    from momcompress.models import decoder_layers

    layers = decoder_layers(model)
    dense = [layer.mlp for layer in layers]  # TealFFN holds these modules' weights: restoring them undoes the conversion
    try:
        t0 = time.time()
        info = calibrate(model, calib, target, split, score=method, x_kept=x_kept)
        seconds = time.time() - t0
        ratio, per_layer, ppl = measure_ratio(model, heldout, batch_size)
    finally:
        for layer, mlp in zip(layers, dense):
            layer.mlp = mlp
    fx = [r["x_kept"] for r in info["layers"]]
    row = {"method": method, "split": split, "target": target, "ppl": ppl, "ratio": ratio, "ratio_per_layer": per_layer,
           "x_kept_per_layer": fx, "x_kept_min": min(fx), "x_kept_max": max(fx), "x_kept_fixed": x_kept, "calibration_seconds": seconds}
    if "selection" in info:
        row["selection"] = info["selection"]
    return row


def format_table(rows: list[dict], dense_ppl: float, tokens: int) -> str:
    """Markdown: one row per method, split and target."""
    lines = [f"dense perplexity {dense_ppl:.2f} on {tokens} held-out tokens", "",
             "| method | split | target | kept x fraction (layers) | held-out ratio | perplexity | calibration s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        fx = f"{r['x_kept_min']:.2f}" if abs(r["x_kept_max"] - r["x_kept_min"]) < 1e-9 else f"{r['x_kept_min']:.2f}-{r['x_kept_max']:.2f}"
        lines.append(f"| {r['method']} | {r['split']} | {r['target']:.2f} | {fx} | {r['ratio']:.3f} | {r['ppl']:.2f} | {r['calibration_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="dense model folder, .gguf or `default`")
    p.add_argument("--methods", default="teal,wina")
    p.add_argument("--splits", default="global,search,equal", help="comma-separated; `fixed` needs --x-kept")
    p.add_argument("--targets", default="0.3,0.5,0.7")
    p.add_argument("--x-kept", type=float, default=None, help="kept gate/up input fraction of the fixed split")
    p.add_argument("--tokens", type=int, default=None, help="calibration tokens (default: the baseline's, 16384)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens (the baseline's --eval-tokens)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data", help="calibration text (default: the embedded novels; held out: Wikipedia paragraphs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", help="write (and resume from) the rows here")
    args = p.parse_args(argv)

    import torch

    from momcompress.baselines.base import DEFAULT_CALIBRATION_TOKENS, BaselineConfig, calibration_and_heldout
    from momcompress.hardware import cpu_name
    from momcompress.metrics import perplexity
    from momcompress.models import load_model, resolve_model_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    config = BaselineConfig(eval_tokens=args.eval_tokens, seq_len=args.seq_len, batch_size=args.batch_size, data=args.data)
    model, tokenizer = load_model(resolve_model_dir(args.model))
    calib, heldout = calibration_and_heldout(tokenizer, config, args.tokens or DEFAULT_CALIBRATION_TOKENS)
    out = Path(args.json) if args.json else None
    saved = json.loads(out.read_text()) if out and out.is_file() else {}
    same = saved.get("setup") == {"model": args.model, "tokens": int(calib.numel()), "eval_tokens": int(heldout.numel()), "data": args.data}
    rows = saved.get("rows", []) if same else []
    with torch.no_grad():
        dense_ppl = saved["dense_ppl"] if same else perplexity(model, heldout, args.batch_size)
    done = {(r["method"], r["split"], r["target"], r["x_kept_fixed"]) for r in rows}
    print(f"# activation sparsity: {int(calib.numel())} calibration tokens, {int(heldout.numel())} held-out tokens, "
          f"{torch.get_num_threads()} threads; CPU: {cpu_name()}", file=sys.stderr, flush=True)
    for target in (float(t) for t in args.targets.split(",") if t):
        for method in (m for m in args.methods.split(",") if m):
            for split in (s for s in args.splits.split(",") if s):
                x_kept = args.x_kept if split == "fixed" else None
                if (method, split, target, x_kept) in done:
                    continue
                print(f"[{method} {split} @ {target}]", file=sys.stderr, flush=True)
                rows.append(study_row(model, calib, heldout, method, split, target, args.batch_size, x_kept))
                if out:
                    tmp = out.with_suffix(".tmp")
                    setup = {"model": args.model, "tokens": int(calib.numel()), "eval_tokens": int(heldout.numel()), "data": args.data}
                    tmp.write_text(json.dumps({"cpu": cpu_name(), "setup": setup, "dense_ppl": dense_ppl, "rows": rows}, indent=1))
                    tmp.replace(out)
                print(format_table(rows, dense_ppl, int(heldout.numel())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
