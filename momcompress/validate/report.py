"""The files of a validation report: per-method report.json / report.md / plots, and the folder's index.

A report folder can hold several methods (MoM at several ratios, the baselines), each validated by its
own `momcompress validate ... -o REPORT_DIR` run:

    REPORT_DIR/methods.json            one summary per method, keyed by the frozen folder's name
    REPORT_DIR/report.md               every method side by side, and the retention-vs-ratio plot
    REPORT_DIR/retention_vs_ratio.png
    REPORT_DIR/<key>/report.json       everything measured for one method
    REPORT_DIR/<key>/report.md         its tables; training_curves.png, blocks_per_layer.png, expert_usage.png

``format_summary`` is the table the CLI prints at the end of a run.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from momcompress.errors import RunDirError
from momcompress.fsutil import atomic_dir_write
from momcompress.validate import plots

INDEX_FILE = "methods.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LEARN_LOG = "log.jsonl"


# ----------------------------------------------------------------------------- number formatting


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _count(value: float) -> str:
    """134515584 -> "134.5M", 2.7e9 -> "2.70G"."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}" if unit == "G" else f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def _ci(r: dict) -> str:
    if not math.isfinite(r["value"]):
        return "n/a (dense 0)"
    if not (math.isfinite(r["ci_low"]) and math.isfinite(r["ci_high"])):
        return _num(r["value"])
    return f"{r['value']:.3f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- one method's tables


def _speed_rows(speed: dict) -> list[tuple[str, dict, str]]:
    """(runtime label, phase result, phase) for every timed phase. An onnxruntime label names the path that ran
    the MoM export's MoMExperts nodes: "onnxruntime cpu (MoMExperts: kernel)" or "(MoMExperts: function body)"
    ("SelectFFN: kernel" / "SelectFFN: function body" for a per-token selector's export)."""
    rows = []
    for runtime in ("torch", "onnxruntime"):
        for dev, result in (speed.get(runtime) or {}).items():
            if not isinstance(result, dict):
                continue
            path = (result.get("experts_path") or {}).get("sparse")
            node = result.get("custom_op", "MoMExperts")
            label = f"{runtime} {dev}" + (f" ({node}: {path})" if path else "")
            for phase in ("prefill", "decode"):
                if phase in result:
                    rows.append((label, result, phase))
    return rows


def _ms(r: dict, side: str, unit: str = "") -> str:
    """Median milliseconds of one side with its min-max over rounds: "12.3 (11.9-13.0)"."""
    lo, hi = r[f"{side}_ms_range"]
    return f"{r[f'{side}_ms']:.1f}{unit} ({lo:.1f}-{hi:.1f})"


def _speed_ratio(r: dict) -> str:
    """Median ratio sparse / dense with its min-max over rounds, flagged when the spread exceeds |ratio - 1|."""
    lo, hi = r["ratio_range"]
    flag = " (!)" if r.get("unstable") else ""
    return f"{_num(r['ratio'], 2)} ({_num(lo, 2)}-{_num(hi, 2)}){flag}"


def format_summary(report: dict) -> str:
    """The report's summary table (markdown): dense vs sparse and their ratio, one metric per row."""
    ppl, zs, c = report["perplexity"], report["zero_shot"], report["cost"]
    rows = [[f"held-out perplexity ({ppl['tokens']} tokens)", _num(ppl["dense"], 2), _num(ppl["sparse"], 2),
             f"retention {_num(ppl['retention'])}"]]
    avg = zs.get("average") or {}
    if avg:
        n = len(zs["tasks"])
        docs = report["settings"]["limit"] or "all"
        for metric in ("acc_norm", "acc"):
            rows.append([f"zero-shot {metric}, mean of {n} task{'s' * (n != 1)} ({docs} docs each)", _num(avg["dense"][metric]),
                         _num(avg["sparse"][metric]), f"retention {_num(avg['retention'][metric])}"])
    ratio = report["activation_ratio"]["measured"]
    rows.append(["FFN activation ratio (parameters read per token)", "1.000", _num(ratio), _num(ratio)])
    if report["activation_ratio"].get("bytes_ratio") is not None:
        b = report["activation_ratio"]["bytes_ratio"]
        rows.append([f"FFN bytes read per token ({report['activation_ratio']['table_dtype']} tables)", "1.000", _num(b), _num(b)])
    rows.append(["active parameters per token", _count(c["dense"]["params"]), _count(c["sparse"]["params"]),
                 _num(c["params_ratio"])])
    rows.append([f"FLOPs per token (context {c['context']})", _count(c["dense"]["flops"]), _count(c["sparse"]["flops"]),
                 _num(c["flops_ratio"])])
    for label, result, phase in _speed_rows(report.get("speed") or {}):
        what = (f"{label} prefill {result['prefill_tokens']} tokens (ms)" if phase == "prefill"
                else f"{label} decode (ms per token)")
        r = result[phase]
        rows.append([what, _ms(r, "dense"), _ms(r, "sparse"), _speed_ratio(r)])
    return _table(["metric", "dense", "sparse", "sparse / dense"], rows)


def format_markdown(report: dict, plot_files: list[str]) -> str:
    """The whole report.md of one method."""
    s = report["settings"]
    out = [f"# Validation of `{report['key']}` ({report['method']}) against its dense model", "",
           f"- frozen model: `{report['frozen_dir']}`", f"- dense model: `{report['dense_model']}`",
           f"- device {s['device']}, {s['dtype']}; held-out text: {s['data']}; wall time "
           f"{report['wall_seconds']:.0f} s", "", "## Summary", "", format_summary(report), ""]
    gate = report["gate"]
    if gate["min_retention"] is not None:
        verdict = "PASSED" if gate["passed"] else "FAILED"
        out += [f"**Gate {verdict}**: average zero-shot retention ({gate['metric']}) "
                f"{_num(gate['average_zero_shot_retention'])} vs --min-retention {gate['min_retention']}.", ""]
    out += [f"- {report['perplexity']['definition']}", f"- {report['zero_shot']['definition']}; "
            f"the gate averages the per-task {report['zero_shot']['retention_metric']} retentions", ""]

    tasks = report["zero_shot"]["tasks"]
    if tasks:
        rows = [[name, str(t["n"]), _num(t["dense"]["acc"]), _num(t["sparse"]["acc"]), _ci(t["retention"]["acc"]),
                 _num(t["dense"]["acc_norm"]), _num(t["sparse"]["acc_norm"]), _ci(t["retention"]["acc_norm"])]
                for name, t in tasks.items()]
        out += ["## Zero-shot accuracy", "", _table(
            ["task", "docs", "dense acc", "sparse acc", "retention [95% CI]", "dense acc_norm", "sparse acc_norm",
             "retention [95% CI]"], rows), ""]

    c = report["cost"]
    parts = [("embedding (one row)", "embedding", None), ("attention projections", "attention", None),
             ("attention q.k and values", None, "attention_flops"), ("FFN", "ffn", None), ("router", "router", None),
             ("lm_head", "lm_head", None), ("norms, biases", "other", None)]
    rows = []
    for label, pkey, fkey in parts:
        def flops(side):
            if fkey:
                return _count(c[side][fkey])
            return "0" if pkey in ("embedding", "other") else _count(2 * c[side][pkey])
        rows.append([label, _count(c["dense"][pkey]) if pkey else "-", _count(c["sparse"][pkey]) if pkey else "-",
                     flops("dense"), flops("sparse")])
    rows.append(["**total**", _count(c["dense"]["params"]), _count(c["sparse"]["params"]), _count(c["dense"]["flops"]),
                 _count(c["sparse"]["flops"])])
    a = report["activation_ratio"]
    out += ["## Cost per token", "", f"Context length {c['context']} tokens for the attention matmuls. "
            f"FFN activation ratio {a['measured']:.4f} measured on {a['tokens']} evaluation tokens "
            f"(freeze measured {_num(a['frozen_manifest'], 4)}, target {_num(a['target'])}).", "",
            _table(["part", "dense params", "sparse params", "dense FLOPs", "sparse FLOPs"], rows), "",
            "Per layer: " + ", ".join(f"{r:.2f}" for r in a["per_layer"]), ""]

    speed = report.get("speed") or {}
    speed_rows = []
    for label, result, phase in _speed_rows(speed):
        r = result[phase]
        unit = "ms" if phase == "prefill" else "ms/token"
        speed_rows.append([label, f"{phase} ({result['prefill_tokens']} tokens)" if phase == "prefill" else
                           f"decode ({result['decode_tokens']} steps after {result['prefill_tokens']})",
                           _ms(r, "dense", " " + unit), _ms(r, "sparse", " " + unit), _speed_ratio(r),
                           f"{1 / r['ratio']:.2f}x", str(result.get("threads", "-"))])
    out += ["## Latency", ""]
    if speed_rows:
        out += [_table(["runtime", "phase", "dense (min-max)", "sparse (min-max)", "sparse / dense (min-max)",
                        "speed-up", "threads"], speed_rows), ""]
        reps = {result["repeats"] for _, result, _ in _speed_rows(speed)}
        warm = {result.get("warmup", 1) for _, result, _ in _speed_rows(speed)}
        out += [f"Median (min-max) of {', '.join(map(str, sorted(reps)))} interleaved rounds after "
                f"{', '.join(map(str, sorted(warm)))} warm-up round(s), threads pinned; the ratio is the median of "
                "the per-round ratios. (!): the ratio's spread is wider than its distance from 1, so this run cannot "
                "tell which model is faster."]
        if report.get("cpu"):  # reports written before the CPU was recorded have none
            out += [f"CPU: {report['cpu']}."]
        for _, result, _ in _speed_rows(speed):
            for warning in result.get("warnings", []):
                if f"**Warning**: {warning}" not in out:
                    out += [f"**Warning**: {warning}"]
        ort = (speed.get("onnxruntime") or {}).get("cpu")
        if ort and "max_abs_logit_diff_vs_torch" in ort:
            d = ort["max_abs_logit_diff_vs_torch"]
            out += [f"onnxruntime vs PyTorch, max |logit difference|: dense {d['dense']:.2e}, sparse {d['sparse']:.2e}."]
            if ort.get("custom_op") == "SelectFFN":
                out += ["The sparse model is a per-token selector: its masks are hard thresholds, and a score that lies on "
                        "one flips with the order of summation, after which the two runtimes' later tokens differ by whole "
                        "neurons; so its logits need not agree closely. The export's checks compare the graph with the "
                        "thresholds off, and each SelectFFN node with them on, allowing only threshold ties."]
        if ort and "note" in ort:
            out += [ort["note"]]
        sparse_path = ((ort or {}).get("experts_path") or {}).get("sparse")
        node = (ort or {}).get("custom_op") or "MoMExperts"
        if sparse_path == "kernel":
            out += [f"The MoM export's {node} nodes ran the compiled momcompress kernel (`{ort['ops_library']}`)."]
            if ort.get("long_calls") == "amx":
                how = ("ran the graph without the file's If nodes" if ort.get("row_switch_removed")
                       else "moved the file's row switch")
                out += [("Its bf16 tables took the kernel's AMX tile products for calls of 5 tokens or more (the "
                         f"file's MatMul branch unused: the session {how}).")]
        elif sparse_path:
            out += [f"The MoM export's {node} nodes ran their ONNX function body: the compiled kernel was not "
                    "registered (build it with `momcompress build-ops`)."]
    for runtime in ("torch", "onnxruntime"):
        if isinstance(speed.get(runtime), dict) and "skipped" in speed[runtime]:
            out += [f"{runtime}: skipped, {speed[runtime]['skipped']}."]
    if "skipped" in speed:
        out += [f"Not measured ({speed['skipped']})."]
    out += [""]

    if plot_files:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plot_files] + [""]
    if report["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- files


def read_index(root: Path) -> dict:
    """REPORT_DIR/methods.json ({} when absent)."""
    path = root / INDEX_FILE
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path} is not readable JSON ({e}); delete it (the per-method reports stay) and validate "
                          "again") from None
    if not isinstance(index, dict):
        raise RunDirError(f"{path} is not a method index; delete it and validate again")
    return index


def method_key(root: Path, frozen_dir: Path, overwrite: bool) -> str:
    """The folder name of this frozen model's report in ROOT: its name, made unique among other models.

    Raises:
        RunDirError: this frozen model already has a report in ROOT and overwrite is False.
    """
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", frozen_dir.resolve().name) or "model"
    index = read_index(root)
    frozen = str(frozen_dir.resolve())
    key, n = base, 1
    while key in index and index[key].get("frozen_dir") != frozen:
        n += 1
        key = f"{base}-{n}"
    if (root / key).exists() and not overwrite:
        raise RunDirError(f"{root / key} already holds a report of {frozen}: pass --overwrite to replace it, or "
                          "choose another -o")
    return key


def _learn_log(run_dir: str | None) -> list[dict] | None:
    path = Path(run_dir) / LEARN_LOG if run_dir else None
    if path is None or not path.is_file():
        return None
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interrupted run
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records or None


def index_entry(report: dict) -> dict:
    """The summary of one report kept in methods.json."""
    zs = report["zero_shot"]["average"] or {}
    decode = ((report.get("speed") or {}).get("torch") or {}).get("cpu", {}).get("decode")
    return {
        "method": report["method"],
        "frozen_dir": report["frozen_dir"],
        "dense_model": report["dense_model"],
        "report": f"{report['key']}/{REPORT_JSON}",
        "activation_ratio": report["activation_ratio"]["measured"],
        "perplexity_dense": report["perplexity"]["dense"],
        "perplexity_sparse": report["perplexity"]["sparse"],
        "perplexity_retention": report["perplexity"]["retention"],
        "zero_shot_retention": (zs.get("retention") or {}).get("acc_norm"),
        "zero_shot_retention_acc": (zs.get("retention") or {}).get("acc"),
        "zero_shot_tasks": report["settings"]["tasks"],
        "zero_shot_limit": report["settings"]["limit"],
        "params_ratio": report["cost"]["params_ratio"],
        "flops_ratio": report["cost"]["flops_ratio"],
        "torch_cpu_decode_ratio": decode["ratio"] if decode else None,
    }


def _index_markdown(index: dict) -> str:
    rows = []
    for key, e in sorted(index.items(), key=lambda kv: (kv[1]["activation_ratio"], kv[0])):
        decode = e.get("torch_cpu_decode_ratio")
        rows.append([f"[{key}]({key}/{REPORT_MD})", e["method"], _num(e["activation_ratio"]), _num(e["params_ratio"]),
                     _num(e["flops_ratio"]), f"{_num(e['perplexity_dense'], 2)} -> {_num(e['perplexity_sparse'], 2)}",
                     _num(e["perplexity_retention"]), _num(e["zero_shot_retention"]),
                     _num(decode, 2) if decode is not None else "n/a"])
    return "\n".join([
        "# Validated methods", "",
        "Every method validated into this folder, against its dense model. Retention: perplexity as dense / sparse, "
        "zero-shot as sparse / dense accuracy (acc_norm, mean over tasks); ratios are sparse / dense.", "",
        _table(["method folder", "method", "FFN ratio", "params ratio", "FLOPs ratio", "perplexity", "ppl retention",
                "zero-shot retention", "torch CPU decode ratio"], rows), "",
        "![retention vs activation ratio](retention_vs_ratio.png)", "",
    ])


def _json_safe(value):
    """NaN and infinities as null, so the files are strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _dump(value) -> str:
    return json.dumps(_json_safe(value), indent=2, allow_nan=False)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(root: Path, key: str, report: dict) -> Path:
    """Write ROOT/KEY/ (report.json, report.md, plots) and update ROOT's index, table and plot.

    Returns:
        The method's folder.
    """
    def write(folder: Path) -> None:
        plot_files = []
        records = _learn_log(report.get("run_dir"))
        if records:
            plots.plot_training_curves(records, folder / "training_curves.png")
            plot_files.append("training_curves.png")
        elif report.get("run_dir"):
            report["notes"].append(f"no training curves: {report['run_dir']}/{LEARN_LOG} is missing or empty")
        blocks = (report.get("blocks") or {}).get("per_layer")
        if blocks:
            plots.plot_blocks_per_layer(blocks, folder / "blocks_per_layer.png")
            plot_files.append("blocks_per_layer.png")
        usage = report["expert_usage"]
        if usage["num_experts"]:  # the TEAL and WINA baselines have no router
            plots.plot_expert_usage(usage["per_layer"], folder / "expert_usage.png", usage["top_k"])
            plot_files.append("expert_usage.png")
        report["plots"] = plot_files
        (folder / REPORT_JSON).write_text(_dump(report))
        (folder / REPORT_MD).write_text(format_markdown(report, plot_files))

    root.mkdir(parents=True, exist_ok=True)
    atomic_dir_write(root / key, write)
    index = read_index(root)
    index[key] = index_entry(report)
    _atomic_write_text(root / INDEX_FILE, _dump(index))
    points = [{"label": k, **e} for k, e in index.items()]
    plots.plot_retention_vs_ratio(points, root / "retention_vs_ratio.png")
    _atomic_write_text(root / REPORT_MD, _index_markdown(index))
    return root / key
