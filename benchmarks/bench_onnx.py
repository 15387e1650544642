"""Dense ONNX vs MoM ONNX in onnxruntime (CPU), side by side, as time ratios (issue 5's benchmark).

Exports the dense model and the frozen MoM model with `momcompress.export` (each checked against
PyTorch), derives one MoM file per MoMExperts function body (the same graph, another body), and times in
onnxruntime, fp32, batch 1, on real held-out text (Wikipedia passages):
- prefill of 128 and 512 tokens (no past);
- a decode step with 128 cached tokens (the cache of a real 128-token prefix; the step's token varies
  over the next --decode-tokens tokens of the text, so routing varies as in generation).
Runs are interleaved (dense, MoM body 1, body 2, dense, ...) so load from other processes hits all
alike; each cell is the median. Before each timed call the benchmark sleeps --settle seconds: onnxruntime's
intra-op threads spin after a run, and without the pause the previous session's spinning threads slowed
the next one (a gather-body decode step read 1.7x dense interleaved, 1.0x alone). A "floor" column
times the MoM graph with its routed experts removed (--no-floor to skip): the best ratio any body could
reach. A "mom kernel" column runs the default export with the compiled momcompress kernel registered
(`momcompress build-ops`; left out, with a note, when it is not built); the body columns run without it.
Goal (issue 5): MoM decode step <= 0.8x dense at ratio 0.5; issue 21: <= 0.7x with the kernel.

    python benchmarks/bench_onnx.py --frozen /tmp/f6 [--dense default] [--threads 2] [--json out.json]
    python benchmarks/bench_onnx.py --frozen F --workdir W   # reuse exports in W from an earlier run

Any block size works (the bodies walk routed blocks of the frozen model's b; checked at b = 1 and 8 on
tiny models); the header and the JSON name the block size, experts and top-k measured.

A per-token selector model (SelectFFN nodes) has one body, the masked-dense one the export writes
("mom body" column), and no floor variant; the "mom kernel" column runs its compiled SelectFFN kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import momcompress
from momcompress.export import op
from momcompress.export.causal_lm import OrtCausalLM
from momcompress.hardware import cpu_name

FLOOR = "floor: no routed"  # the variant without routed experts
KERNEL = "mom kernel"  # the default export with the compiled momcompress kernel registered


def export_once(source: str, folder: Path, dense: bool) -> Path:
    if not (folder / "manifest.json").is_file():
        print(f"exporting {source} -> {folder} ...", file=sys.stderr, flush=True)
        momcompress.export(source, folder, dense=dense, overwrite=True, new_tokens=8)
    return folder


def _variant(mom_folder: Path, name: str, workdir: Path, change) -> Path:
    """workdir/name: a copy of the MoM export's model.onnx after change(model) (built once, then reused)."""
    import shutil

    import onnx

    target = workdir / name
    if (target / "model.onnx").is_file():
        return target
    manifest = json.loads((mom_folder / "manifest.json").read_text())
    model = onnx.load(str(mom_folder / "model.onnx"))
    change(model)
    tmp = workdir / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    onnx.save_model(model, tmp / "model.onnx", save_as_external_data=bool(manifest["onnx"]["external_data"]), location="model.onnx.data")
    tmp.rename(target)
    return target


def with_body(mom_folder: Path, body: str, workdir: Path) -> Path:
    """A copy of the MoM export whose MoMExperts nodes use body (the graph is otherwise identical)."""
    if json.loads((mom_folder / "manifest.json").read_text())["experts_body"] == body:
        return mom_folder
    activation = json.loads((mom_folder / "config.json").read_text())["momcompress"]["activation"]
    return _variant(mom_folder, f"mom-{body}", workdir, lambda model: op.attach_function(model, body, activation))


def without_routed(mom_folder: Path, workdir: Path) -> Path:
    """The MoM export with the routed experts costing nothing (each node passes its shared output on):
    wrong logits, but its time is the floor that any MoMExperts body could reach."""
    from onnx import helper

    def drop_routed(model) -> None:
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        del model.functions[:]
        identity = [helper.make_node("Identity", ["accumulate"], ["out"])]
        model.functions.append(op._mom_function(identity, [helper.make_opsetid("", opset)], "no routed experts (benchmark floor)"))

    return _variant(mom_folder, "mom-no-routed", workdir, drop_routed)


def text_tokens(tokenizer, count: int) -> np.ndarray:
    """count tokens (1, count) of held-out text (the default Wikipedia passages, else a fixed sample)."""
    from momcompress.calibration.data import default_heldout_texts

    text = " ".join(default_heldout_texts()[:40])
    ids = tokenizer(text, return_tensors="np")["input_ids"][:, :count].astype(np.int64)
    if ids.shape[1] < count:
        raise SystemExit(f"not enough held-out text for {count} tokens")
    return ids


def time_prefill(lm: OrtCausalLM, ids: np.ndarray) -> float:
    mask = np.ones_like(ids)
    pos = np.arange(ids.shape[1], dtype=np.int64)[None]
    t = time.perf_counter()
    lm.run(ids, mask, pos, lm.first_past(1))
    return time.perf_counter() - t


def time_decode(lm: OrtCausalLM, ids: np.ndarray, past: int, steps: int) -> float:
    """Mean time of one decode step with `past` cached tokens, over `steps` different next tokens."""
    prefix = ids[:, :past]
    _, cache = lm.run(prefix, np.ones_like(prefix), np.arange(past, dtype=np.int64)[None], lm.first_past(1))
    mask = np.ones((1, past + 1), dtype=np.int64)
    pos = np.array([[past]], dtype=np.int64)
    total = 0.0
    for i in range(steps):
        tok = ids[:, past + i : past + i + 1]
        t = time.perf_counter()
        lm.run(tok, mask, pos, cache)
        total += time.perf_counter() - t
    return total / steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frozen", required=True, help="Frozen MoM model folder (momcompress freeze output).")
    ap.add_argument("--dense", default="default", help="Its dense source model (folder, .gguf or 'default').")
    ap.add_argument("--bodies", default=",".join(op.BODIES), help="MoMExperts function bodies to time.")
    ap.add_argument("--prefills", default="128,512", help="Prompt lengths timed as prefills (comma-separated).")
    ap.add_argument("--decode-past", type=int, default=128, help="Cached tokens before the timed decode steps.")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads.")
    ap.add_argument("--repeats", type=int, default=5, help="Interleaved rounds per cell (median).")
    ap.add_argument("--decode-tokens", type=int, default=16, help="Different next tokens averaged per decode round.")
    ap.add_argument("--workdir", help="Where the exports go (kept; reused when present). Default: a temporary folder.")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                    help="Also time the MoM graph with its routed experts removed: the floor any body could reach.")
    ap.add_argument("--kernel", action=argparse.BooleanOptionalAction, default=True,
                    help="Also time the default export with the compiled momcompress kernel (when `momcompress build-ops` built it).")
    ap.add_argument("--settle", type=float, default=0.2, help="Seconds to sleep before each timed call (lets the previous session's threads stop spinning).")
    ap.add_argument("--json", help="Also write the results as JSON here.")
    args = ap.parse_args(argv)
    prefills = [int(n) for n in args.prefills.split(",") if n]

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_onnx."))
    workdir.mkdir(parents=True, exist_ok=True)
    dense_dir = export_once(args.dense, workdir / "dense", dense=True)
    mom_dir = export_once(args.frozen, workdir / "mom", dense=False)
    selector = json.loads((mom_dir / "manifest.json").read_text()).get("custom_domain", {}).get("op_type") == "SelectFFN"
    bodies = [] if selector else [b for b in args.bodies.split(",") if b]
    variants = {"dense": dense_dir}
    if selector:
        variants["mom body"] = mom_dir
    for b in bodies:
        try:
            variants[f"mom {b}"] = with_body(mom_dir, b, workdir)
        except ValueError as exc:
            print(f"skipping the {b} body: {exc}", file=sys.stderr)
    if args.floor and not selector:
        variants[FLOOR] = without_routed(mom_dir, workdir)
    modes = {name: "body" for name in variants}
    from momcompress.export import ort_ops

    if args.kernel and ort_ops.find_library() is not None:
        variants[KERNEL], modes[KERNEL] = mom_dir, "kernel"
    elif args.kernel:
        print(f"no kernel column: {ort_ops.missing_message()}", file=sys.stderr)
    sessions = {name: OrtCausalLM(folder / "model.onnx", threads=args.threads, experts=modes[name]) for name, folder in variants.items()}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mom_dir)
    ids = text_tokens(tok, max([*prefills, args.decode_past + args.decode_tokens]))
    workloads = {f"prefill {n}": (lambda lm, n=n: time_prefill(lm, ids[:, :n])) for n in prefills}
    workloads[f"decode step, {args.decode_past} cached"] = lambda lm: time_decode(lm, ids, args.decode_past, args.decode_tokens)
    for lm in sessions.values():  # warm-up (first runs allocate)
        for fn in workloads.values():
            fn(lm)
    times: dict[str, dict[str, list[float]]] = {w: {v: [] for v in sessions} for w in workloads}
    for r in range(args.repeats):
        for w, fn in workloads.items():
            for v, lm in sessions.items():
                time.sleep(args.settle)
                times[w][v].append(fn(lm))
        print(f"round {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    frozen_manifest = json.loads((Path(args.frozen) / "manifest.json").read_text())
    mom_config = json.loads((Path(args.frozen) / "config.json").read_text())["momcompress"]
    block_size = mom_config.get("block_size")
    rows = []
    for w in workloads:
        dense_ms = statistics.median(times[w]["dense"]) * 1e3
        row = {"workload": w, "dense_ms": dense_ms}
        for v in sessions:
            if v != "dense":
                ms = statistics.median(times[w][v]) * 1e3
                row[f"{v} ms"] = ms
                row[f"{v} ratio"] = ms / dense_ms
        rows.append(row)
    mom_names = [v for v in sessions if v != "dense"]
    shape = ("per-token selector" if selector else
             f"block size {block_size}, {mom_config.get('num_experts')} experts top-{mom_config.get('top_k')}")
    print(f"onnxruntime CPU, fp32, batch 1, {args.threads} threads; frozen model measured ratio "
          f"{frozen_manifest.get('measured_ratio', float('nan')):.3f}, {shape}; median of {args.repeats} rounds; CPU: {cpu_name()}")
    long_calls = {name: lm.long_calls + (" (no If nodes)" if getattr(lm, "row_switch_removed", False) else "")
                  for name, lm in sessions.items() if getattr(lm, "long_calls", None)}
    if long_calls:  # what ran a selector layer's calls of more than the file's row_tokens tokens
        print("selector calls above the file's row switch: " + ", ".join(f"{k}: {v}" for k, v in long_calls.items()))
    header = f"{'workload':<26} {'dense ms':>9} " + " ".join(f"{v + ' ms':>18} {'ratio':>6}" for v in mom_names)
    print(header)
    for row in rows:
        cells = " ".join(f"{row[f'{v} ms']:>18.2f} {row[f'{v} ratio']:>5.2f}x" for v in mom_names)
        print(f"{row['workload']:<26} {row['dense_ms']:>9.2f} {cells}")
    decode = rows[-1]
    best = min((v for v in mom_names if v != FLOOR), key=lambda v: decode[f"{v} ratio"])
    goal = decode[f"{best} ratio"] <= 0.8
    print(f"decode goal (MoM <= 0.8x dense): {'met' if goal else 'NOT met'} ({best}: {decode[f'{best} ratio']:.2f}x)")
    if KERNEL in sessions:
        kernel_rows = {row["workload"]: row[f"{KERNEL} ratio"] for row in rows}
        prefill_ok = all(r <= 1.05 for w, r in kernel_rows.items() if w.startswith("prefill"))
        print(f"kernel goal (decode <= 0.7x, prefills <= 1.05x dense): "
              f"{'met' if decode[f'{KERNEL} ratio'] <= 0.7 and prefill_ok else 'NOT met'} "
              f"(decode {decode[f'{KERNEL} ratio']:.2f}x, " + ", ".join(f"{w} {r:.2f}x" for w, r in kernel_rows.items() if w.startswith("prefill")) + ")")
    if args.json:
        result = {
            "cpu": cpu_name(), "threads": args.threads, "repeats": args.repeats, "frozen": str(args.frozen), "dense": args.dense,
            "measured_ratio": frozen_manifest.get("measured_ratio"), "block_size": block_size, "selector": selector,
            "experts": mom_config.get("num_experts"), "top_k": mom_config.get("top_k"), "rows": rows, "raw_seconds": times, "decode_goal_met": goal,
            "experts_paths": {name: lm.experts_path for name, lm in sessions.items()},
            "long_calls": {name: getattr(lm, "long_calls", None) for name, lm in sessions.items()},
            "row_switch_removed": {name: getattr(lm, "row_switch_removed", False) for name, lm in sessions.items()},
        }
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
