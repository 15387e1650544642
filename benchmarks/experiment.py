"""MoM vs MoEfication, static pruning, TEAL and WINA vs the dense model, at the same activation ratio(s).

For every target ratio this builds (or reuses) one frozen model folder per method, validates each
into one report folder against the dense original with the same held-out text, tasks and documents,
and prints one table: calibration budget (tokens and wall time), measured FFN ratio, held-out
perplexity, zero-shot accuracy per task (acc_norm), retention, active parameters and latency ratios.
Every method meets its target under one rule (momcompress/ratio_rule.py), printed under the table:
the fit on calibration tokens must be within ±0.01 of the target or the build fails; the table's ratio
and perplexity are measured on held-out tokens no method fitted on.

    python benchmarks/experiment.py --targets 0.5 --limit 100 -o runs/experiment --json runs/experiment.json

Builds and validations are cached: a method folder that already exists under OUTPUT is reused, and so is
its validation when the settings are the same (pass --rebuild to build and validate again), so an
interrupted experiment resumes where it stopped. --mom-run RUN_DIR reuses a
finished `momcompress learn` run for MoM at its own target; repeat it to give one run per target. The
dense model's perplexity and zero-shot scores are computed once and shared by every validation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from momcompress.hardware import cpu_name

METHODS = ("mom", "mom-experts", "moefication", "prune", "teal", "wina")
# mom: `momcompress learn` as it defaults (the per-token selector); mom-experts: learn --selector experts.
DEFAULT_METHODS = ("mom", "moefication", "prune", "teal", "wina")
THRESHOLD_METHODS = ("teal", "wina")  # training-free: --split applies to them


def _build(method: str, target: float, out: Path, args) -> dict:
    """Build METHOD at TARGET into OUT (a frozen model folder); return {tokens, seconds}."""
    from momcompress.baselines.base import BaselineConfig, baseline
    from momcompress.config import EXPERT_OPTIONS, LearnConfig
    from momcompress.freeze.freezer import freeze
    from momcompress.learn.trainer import learn
    from momcompress.ratio_rule import RATIO_TOLERANCE

    t0 = time.time()
    if method in ("mom", "mom-experts"):
        selector = "experts" if method == "mom-experts" else "activations"
        given = args.mom_runs.get((selector, target))
        run = given if given is not None else out.with_name(out.name + "-run")
        if given is None and (args.rebuild or not run.is_dir()):
            options = {**args.learn_options, "selector": selector, "target": target, "steps": args.steps, "seed": args.seed,
                       "data": args.data}
            if selector != "experts":  # the expert masks' options (--learn-option block_size=...) are theirs only
                options = {k: v for k, v in options.items() if k not in EXPERT_OPTIONS}
            learn(args.model, run, LearnConfig(**options), overwrite=True)
        manifest = json.loads((run / "manifest.json").read_text())
        freeze(run, out, overwrite=True, tolerance=RATIO_TOLERANCE)
        cfg = manifest["config"]
        tokens = cfg["steps"] * cfg["batch_size"] * cfg["seq_len"] * manifest.get("world_size", 1)
        seconds = manifest.get("wall_seconds")
        frozen = json.loads((out / "manifest.json").read_text())
        return {"tokens": tokens, "seconds": (seconds if seconds is not None else time.time() - t0), "fit_ratio": frozen["fit_ratio"],
                "ratio_note": frozen["ratio_note"]}
    cfg = BaselineConfig(target=target, steps=args.steps if method == "prune" else None, seed=args.seed, data=args.data,
                         tokens=args.calibration_tokens if method != "prune" else None, seq_len=args.seq_len,
                         eval_tokens=args.eval_tokens, block_size=args.learn_options.get("block_size"),
                         learn_options={k: v for k, v in args.learn_options.items() if k != "block_size"},
                         **(_split_options(args) if method in THRESHOLD_METHODS else {}))
    manifest = baseline(method, args.model, out, cfg, overwrite=True)
    cal = manifest["calibration"]
    build = {"tokens": cal["tokens"], "seconds": cal.get("wall_seconds", time.time() - t0), "fit_ratio": manifest["fit_ratio"],
             "ratio_note": manifest["ratio_note"]}
    if method in THRESHOLD_METHODS:
        build["split"] = _split_options(args)
    return build


def _split_options(args) -> dict:
    """TEAL / WINA's split options from the command line (BaselineConfig's defaults where not given)."""
    from momcompress.baselines.base import BaselineConfig

    return {"split": args.split or BaselineConfig.split, "x_kept": args.x_kept}


def _row(method: str, target: float, build: dict, report: dict, tasks: list[str]) -> dict:
    zs = report["zero_shot"]
    speed = ((report.get("speed") or {}).get("torch") or {}).get("cpu") or {}
    return {
        "method": method,
        "target": target,
        "split": (build.get("split") or {}).get("split"),  # teal / wina only
        "calibration_tokens": build["tokens"],
        "build_seconds": build["seconds"],
        "fit_ratio": build.get("fit_ratio"),
        "ratio_note": build.get("ratio_note"),
        "ratio": report["activation_ratio"]["measured"],
        # what the method reads per token as a fraction of the dense FFN, its router included (DESIGN.md)
        "read_incl_router": (report["cost"]["sparse"]["ffn"] + report["cost"]["sparse"]["router"]) / report["cost"]["dense"]["ffn"],
        "ppl_dense": report["perplexity"]["dense"],
        "ppl": report["perplexity"]["sparse"],
        "acc_norm": {t: zs["tasks"][t]["sparse"]["acc_norm"] for t in tasks if t in zs["tasks"]},
        "acc_norm_dense": {t: zs["tasks"][t]["dense"]["acc_norm"] for t in tasks if t in zs["tasks"]},
        "retention_acc_norm": ((zs.get("average") or {}).get("retention") or {}).get("acc_norm"),
        "retention_acc": ((zs.get("average") or {}).get("retention") or {}).get("acc"),
        "params_ratio": report["cost"]["params_ratio"],
        "flops_ratio": report["cost"]["flops_ratio"],
        "prefill_ratio": (speed.get("prefill") or {}).get("ratio"),
        "decode_ratio": (speed.get("decode") or {}).get("ratio"),
    }


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def format_table(rows: list[dict], tasks: list[str]) -> str:
    """The markdown table of rows, followed by the ratio rule every method was held to and any held-out notes."""
    from momcompress.ratio_rule import describe

    head = ["method", "target", "calib tokens", "build s", "fit ratio", "FFN ratio (held out)", "FFN read incl. router",
            "perplexity", *tasks, "zero-shot retention", "params ratio", "prefill ratio", "decode ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dense = next(iter(rows), None)
    if dense is not None:
        lines.append("| " + " | ".join(["dense", "1.0", "-", "-", "-", "1.000", "1.000", _fmt(dense["ppl_dense"], 2),
                                        *[_fmt(dense["acc_norm_dense"].get(t)) for t in tasks], "1.000", "1.000",
                                        "1.00", "1.00"]) + " |")
    for r in rows:
        lines.append("| " + " | ".join([
            r["method"], _fmt(r["target"], 2), str(r["calibration_tokens"]), _fmt(r["build_seconds"], 0),
            _fmt(r.get("fit_ratio")), _fmt(r["ratio"]), _fmt(r.get("read_incl_router")), _fmt(r["ppl"], 2),
            *[_fmt(r["acc_norm"].get(t)) for t in tasks],
            _fmt(r["retention_acc_norm"]), _fmt(r["params_ratio"]), _fmt(r["prefill_ratio"], 2),
            _fmt(r["decode_ratio"], 2)]) + " |")
    lines += ["", f"Ratio rule (all methods): {describe()}."]
    lines += [f"- {r['method']} @ {r['target']}: {r['ratio_note']}" for r in rows if r.get("ratio_note")]
    return "\n".join(lines)


def plot_frontier(rows: list[dict], path: Path) -> None:
    """Quality against the fraction of FFN parameters read (router included), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["read_incl_router"])
        xs = [r["read_incl_router"] for r in pts]
        ax_ppl.plot(xs, [r["ppl"] for r in pts], marker="o", label=method)
        ax_acc.plot(xs, [r["retention_acc_norm"] if r["retention_acc_norm"] is not None else math.nan for r in pts],
                    marker="o", label=method)
    if rows:
        ax_ppl.axhline(rows[0]["ppl_dense"], color="grey", linestyle="--", label="dense")
        ax_acc.axhline(1.0, color="grey", linestyle="--", label="dense")
    ax_ppl.set(xlabel="fraction of FFN parameters read per token (router included)", ylabel="held-out perplexity",
               yscale="log", title="perplexity")
    ax_acc.set(xlabel="fraction of FFN parameters read per token (router included)", ylabel="zero-shot acc_norm retention",
               title="zero-shot retention")
    for ax in (ax_ppl, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="dense model folder, .gguf or `default`")
    p.add_argument("--targets", default="0.5", help="comma-separated activation ratios")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (mom: learn's default per-token selector; "
                        "mom-experts: learn --selector experts)")
    p.add_argument("--steps", type=int, default=None, help="learn steps for mom and prune (default: learn's default)")
    p.add_argument("--mom-run", action="append", default=[],
                   help="reuse this finished learn run at its own target, for mom (a selector run) or mom-experts (an "
                        "expert-mask run); repeat for several targets; targets without one are learned")
    p.add_argument("--data", help="calibration text for every method (default: the embedded novels)")
    p.add_argument("--calibration-tokens", type=int, default=None, help="moefication / teal / wina calibration tokens (default theirs)")
    p.add_argument("--split", choices=("global", "search", "equal", "fixed"), default=None,
                   help="teal / wina: split of the budget between the gate/up and down inputs (default: the baseline's)")
    p.add_argument("--x-kept", type=float, default=None, help="teal / wina with --split fixed: kept fraction of the gate/up input")
    p.add_argument("--seq-len", type=int, default=256, help="window length for calibration and perplexity")
    p.add_argument("--eval-tokens", type=int, default=8192, help="tokens the builders fit the ratio on, and held-out tokens they report it on")
    p.add_argument("--learn-option", action="append", default=[], metavar="KEY=VALUE",
                   help="further LearnConfig field for mom and prune (repeatable), e.g. batch_size=2")
    p.add_argument("--limit", type=int, default=100, help="zero-shot documents per task")
    p.add_argument("--tasks", default="arc_easy,arc_challenge,piqa,hellaswag,winogrande")
    p.add_argument("--heldout-tokens", type=int, default=16384, help="held-out tokens for validate's perplexity")
    p.add_argument("--no-speed", action="store_true", help="skip the latency measurements")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="runs/experiment", help="folder for the method folders and reports")
    p.add_argument("--rebuild", action="store_true", help="rebuild method folders that already exist")
    p.add_argument("--json", help="write the rows as JSON here")
    args = p.parse_args(argv)

    from momcompress.config import LearnConfig
    from momcompress.validate.validator import validate

    if args.steps is None:
        args.steps = LearnConfig().steps
    args.learn_options = {"seq_len": args.seq_len, "eval_tokens": args.eval_tokens}
    for item in args.learn_option:
        key, _, value = item.partition("=")
        try:
            args.learn_options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            args.learn_options[key.replace("-", "_")] = value  # a plain string, e.g. dtype=bfloat16
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {METHODS}")
    tasks = [t for t in args.tasks.split(",") if t]
    targets = [float(t) for t in args.targets.split(",") if t]
    args.mom_runs = {}
    for run in map(Path, args.mom_run):
        try:
            run_config = json.loads((run / "manifest.json").read_text())["config"]
            run_target = run_config["target"]
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--mom-run {run}: not a finished `momcompress learn` run ({e})")
        selector = run_config.get("selector", "experts")  # runs from before the selector learned expert masks
        match = [t for t in targets if abs(t - run_target) < 1e-9]
        if not match:
            p.error(f"--mom-run {run} was learned at target {run_target}, which is not in --targets {args.targets}")
        if (selector, match[0]) in args.mom_runs:
            p.error(f"two --mom-run {selector} folders for target {run_target}: {args.mom_runs[(selector, match[0])]} and {run}")
        args.mom_runs[(selector, match[0])] = run
    root = Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    print(f"# experiment: {','.join(methods)} at {args.targets}, tasks {','.join(tasks) or 'none'}; CPU: {cpu_name()}",
          file=sys.stderr, flush=True)
    rows = []
    dense_cache: dict = {}  # the dense model's results, computed by the first validation and reused
    for target in targets:
        for method in methods:
            out = root / f"{method}-t{target}"
            stamp, saved = out / "experiment_build.json", out / "experiment_row.json"
            stale = method in THRESHOLD_METHODS and stamp.is_file() and \
                json.loads(stamp.read_text()).get("split") != _split_options(args)  # built with another split
            if args.rebuild or stale or not stamp.is_file():
                saved.unlink(missing_ok=True)
                build = _build(method, target, out, args)
                stamp.write_text(json.dumps(build))
            build = json.loads(stamp.read_text())
            # a validation with the same settings of the same build is reused, so the experiment resumes there too
            key = {"build": build, "model": args.model, "tasks": tasks, "limit": args.limit, "seq_len": args.seq_len,
                   "heldout_tokens": args.heldout_tokens, "speed": not args.no_speed}
            earlier = json.loads(saved.read_text()) if saved.is_file() else {}
            if earlier.get("key") == key:
                print(f"[{method} @ {target}] reusing its validation ({saved})", file=sys.stderr, flush=True)
                row = earlier["row"]
            else:
                print(f"[{method} @ {target}] built from {build['tokens']} tokens in {build['seconds']:.0f} s; validating",
                      file=sys.stderr, flush=True)
                report = validate(out, dense=args.model, output=root / "validation", task_names=",".join(tasks),
                                  limit=args.limit or None, heldout_tokens=args.heldout_tokens, seq_len=args.seq_len,
                                  measure_speed=not args.no_speed, overwrite=True, dense_cache=dense_cache)
                row = _row(method, target, build, report, tasks)
                tmp = saved.with_suffix(".tmp")
                tmp.write_text(json.dumps({"key": key, "row": row}))
                tmp.replace(saved)
            rows.append(row)
            print(format_table(rows, tasks), flush=True)
            (root / "experiment.md").write_text(format_table(rows, tasks) + "\n")
            plot_frontier(rows, root / "frontier.png")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "tasks": tasks, "limit": args.limit, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
