"""Learning curve of `learn`: held-out perplexity against training tokens, from one long run.

One `learn` run of --steps steps keeps a copy of its checkpoint at each step of --at; afterwards every
copy (and the finished run) is evaluated the way `learn` evaluates its final state: fp32, deterministic
gates matched to the target on the held-out windows, perplexity on the same windows. Learning rates
are constant after the warm-up, so a snapshot past the warm-up is the model a shorter run would stop
at, except that its warm-up was longer. Pick --at at or after the warm-up's end (warmup x steps).

    python benchmarks/learning_curve.py --steps 600 --at 300,450 -o runs/curve --json runs/curve.json

The run folder is OUTPUT/run; an interrupted run resumes from its last checkpoint when started again
with the same options, and snapshots already taken are kept.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from momcompress.hardware import cpu_name


def _table(rows: list[dict]) -> str:
    head = "| step | train tokens | learn s (sum of steps) | KD (train, last step) | held-out ratio | held-out ppl | dense ppl |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['tokens']} | {r['step_seconds']:.0f} | {r['kd']:.3f} | {r['ratio']:.3f} | "
            f"{r['ppl']:.2f} | {r['ppl_dense']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="dense model folder, .gguf or `default`")
    p.add_argument("--steps", type=int, default=600, help="end-to-end steps of the run (default 600: 4x learn's default)")
    p.add_argument("--at", default="300,450", help="steps at which to snapshot and evaluate (the final step always is)")
    p.add_argument("--learn-option", action="append", default=[], metavar="KEY=VALUE",
                   help="further LearnConfig field (repeatable), e.g. experts=128")
    p.add_argument("-o", "--output", default="runs/curve", help="folder for the run and its snapshots")
    p.add_argument("--json", help="write the rows as JSON here")
    args = p.parse_args(argv)

    import torch

    from momcompress.config import LearnConfig
    from momcompress.learn.trainer import LOG_FILE, MANIFEST_FILE, Learner, RunPaths, final_heldout_metrics, learn, learning_data, resolve_block_size
    from momcompress.models import ffn_width, load_model, resolve_model_dir

    options = {}
    for item in args.learn_option:
        key, _, value = item.partition("=")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value
    at = sorted({int(s) for s in args.at.split(",") if s})
    if any(s <= 0 or s >= args.steps for s in at):
        p.error(f"--at steps must lie strictly between 0 and --steps ({args.steps}); got {at}")
    every = math.gcd(*at, options.get("checkpoint_every", 25))
    config = LearnConfig(**{**options, "steps": args.steps, "checkpoint_every": every})
    warm_end = round(config.warmup_fraction * config.total_steps)
    early = [s for s in at if s + config.layerwise_steps < warm_end]
    if early:
        print(f"note: snapshots {early} fall inside the warm-up (ends at step {warm_end}); their ratio is above the target",
              file=sys.stderr)
    print(f"# learning curve: {args.steps} steps, snapshots at {at}; CPU: {cpu_name()}", file=sys.stderr, flush=True)
    root = Path(args.output)
    run, snaps = root / "run", root / "snapshots"
    snaps.mkdir(parents=True, exist_ok=True)
    paths = RunPaths.of(run)

    def on_step(metrics: dict) -> None:
        step = metrics["step"] - config.layerwise_steps
        if step in at and not (snaps / f"step-{step}").exists():
            tmp = snaps / f".step-{step}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(paths.checkpoint, tmp)
            tmp.rename(snaps / f"step-{step}")

    if not (run / MANIFEST_FILE).is_file():
        learn(args.model, run, config, resume=paths.partial.exists(), on_step=on_step)
    manifest = json.loads((run / MANIFEST_FILE).read_text())
    log = [json.loads(line) for line in (run / LOG_FILE).read_text().splitlines() if line.strip()]

    def log_at(step: int) -> dict:
        done = [r for r in log if r["step"] <= step + config.layerwise_steps]
        seconds = sum(config.tokens_per_step / r["tok_per_s"] for r in done if r.get("tok_per_s"))
        return {"kd": done[-1].get("kd", float("nan")), "step_seconds": seconds}

    rows = []
    model_dir = resolve_model_dir(args.model)
    for step in at:
        folder = snaps / f"step-{step}"
        if not folder.is_dir():
            print(f"no snapshot at step {step} (the run was resumed past it?); skipped", file=sys.stderr)
            continue
        model, tokenizer = load_model(model_dir, dtype=torch.float32, device=torch.device("cpu"))
        learner = Learner(model, config, resolve_block_size(config, ffn_width(model)), torch.device("cpu"))
        learner.load(folder)
        learner.full_precision()
        model.eval()
        train, heldout = learning_data(config, tokenizer)
        m = final_heldout_metrics(model, config, train, heldout)
        rows.append({"step": step, "tokens": step * config.tokens_per_step, **log_at(step), "ratio": m["target_matched_ratio"],
                     "ppl": m["perplexity_target_matched"], "ppl_dense": m["perplexity_dense"]})
        print(_table(rows), file=sys.stderr, flush=True)
    m = manifest["metrics"]
    rows.append({"step": args.steps, "tokens": args.steps * config.tokens_per_step, **log_at(args.steps),
                 "ratio": m["target_matched_ratio"], "ppl": m["perplexity_target_matched"], "ppl_dense": m["perplexity_dense"]})
    table = _table(rows)
    print(table)
    (root / "curve.md").write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "config": config.to_dict(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
