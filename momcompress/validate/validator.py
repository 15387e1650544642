"""`validate`: a frozen model against its dense original, side by side in one run (DESIGN.md, "Validation").

Orchestration only: the zero-shot scoring is in tasks.py, the cost formulas in cost.py, the timing in
speed.py, the plots in plots.py and the report files in report.py. Run it with
`momcompress validate FROZEN_DIR --dense MODEL -o REPORT_DIR`, or from Python::

    report = momcompress.validate("frozen/", dense="default", output="reports/", limit=200)

1. Check the inputs before any long work: FROZEN_DIR is a frozen model, MODEL has the same architecture
   and tokenizer, every task exists, the evaluation text gives at least one window and is not the
   learn run's calibration text.
2. Held-out perplexity of both models on the same windows; on the MoM model, hooks on every FFN record
   the blocks each token reads (the activation ratio) and the experts its router picks.
3. Zero-shot accuracy of both models on the same documents; retention with a paired bootstrap CI.
4. Per-token cost (cost.py) from the measured blocks; latency (speed.py) in PyTorch and onnxruntime.
5. Write REPORT_DIR/<method>/ (report.json, report.md, plots), update REPORT_DIR's method index, and
   raise RetentionBelowThresholdError when --min-retention is not met (after writing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from momcompress import __version__
from momcompress.errors import ConfigError, DataError, ModelLoadError, MomcompressError, RunDirError
from momcompress.hardware import cpu_name
from momcompress.modelio import library_versions
from momcompress.validate import cost, report as report_files, speed, tasks

log = logging.getLogger(__name__)

DEFAULT_TASKS = tuple(tasks.TASKS)
DEFAULT_LIMIT = 200  # documents per task, to keep a CPU run short (the five tasks hold 299 to 10042); 0 = all
DEFAULT_HELDOUT_TOKENS = 16384  # as DESIGN.md's reference measurements (16k tokens, 256-token windows)
DEFAULT_SEQ_LEN = 256
RETENTION_METRIC = "acc_norm"  # the metric --min-retention averages over tasks
# Config fields that must agree between the dense model and the frozen one (the FFN width is kept too).
SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings")
PERPLEXITY_DEFINITION = ("perplexity retention = dense perplexity / sparse perplexity (1 = as good as dense, "
                         "0.5 = twice the dense perplexity)")
ZERO_SHOT_DEFINITION = ("zero-shot retention = sparse accuracy / dense accuracy on the same documents; 95% CI "
                        "from a paired bootstrap over documents (1000 resamples)")


class RetentionBelowThresholdError(MomcompressError):
    """Average zero-shot retention is below --min-retention; the report was written (see .report)."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


# ----------------------------------------------------------------------------- input checks


def _read_frozen(frozen_dir: Path) -> tuple[object, dict]:
    """(config, manifest) of a frozen folder; the manifest is {} when the folder has none."""
    from momcompress.runtime.load import read_frozen_config

    config = read_frozen_config(frozen_dir)
    path = frozen_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path} is not readable JSON ({e}); freeze again") from None
    return config, manifest


def check_same_model(frozen_config, dense_config, frozen_dir: Path, dense_dir: Path, source: str | None) -> None:
    """Raise ModelLoadError unless the dense model has the frozen model's architecture and sizes."""
    diffs = []
    for field in SHAPE_FIELDS:
        a, b = getattr(frozen_config, field, None), getattr(dense_config, field, None)
        if a != b:
            diffs.append(f"{field} {b!r} (dense) vs {a!r} (frozen)")
    if diffs:
        hint = f" (its manifest names {source})" if source else ""
        raise ModelLoadError(f"the dense model {dense_dir} is not the model {frozen_dir} was frozen from: "
                             f"{'; '.join(diffs)}; pass --dense the original model{hint}")


def check_same_tokenizer(frozen_tok, dense_tok, frozen_dir: Path, dense_dir: Path) -> None:
    """Raise ModelLoadError unless both tokenizers map the same strings to the same ids."""
    fv, dv = frozen_tok.get_vocab(), dense_tok.get_vocab()
    if fv != dv:
        only_f = sorted(set(fv) - set(dv))[:3]
        changed = sorted(k for k in set(fv) & set(dv) if fv[k] != dv[k])[:3]
        raise ModelLoadError(
            f"the tokenizer of {dense_dir} differs from {frozen_dir}'s ({len(dv)} vs {len(fv)} entries; e.g. only in "
            f"the frozen one: {only_f}, different ids: {changed}): both models must read the same token ids; pass "
            "--dense the model the frozen folder was made from"
        )
    for attr in ("bos_token_id", "eos_token_id"):
        if getattr(frozen_tok, attr) != getattr(dense_tok, attr):
            raise ModelLoadError(f"{attr} is {getattr(dense_tok, attr)} in {dense_dir} but {getattr(frozen_tok, attr)} "
                                 f"in {frozen_dir}; pass --dense the original model")


def parse_tasks(names) -> list[str]:
    """Task names from a list or a comma-separated string; "none" or "" selects no task."""
    if isinstance(names, str):
        names = [] if names.strip().lower() in ("", "none") else names.split(",")
    names = [n.strip() for n in names if n.strip()]
    if len(set(names)) != len(names):
        raise ConfigError(f"--tasks lists a task twice: {names}")
    return names


def _learn_manifest(frozen_manifest: dict) -> dict | None:
    run_dir = frozen_manifest.get("run_dir")
    path = Path(run_dir) / "manifest.json" if run_dir else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _check_not_calibration(data: str | None, learn: dict | None) -> None:
    """Raise DataError when --data is (or holds) the text the learn run calibrated on."""
    calib = ((learn or {}).get("config") or {}).get("data")
    if data is None or calib in (None, "default") or data == "default":
        return
    a, b = Path(data).resolve(), Path(calib).resolve()
    if a == b or b.is_relative_to(a) or a.is_relative_to(b):
        raise DataError(f"--data {data} is the learn run's calibration text ({calib}); measuring on it would "
                        "overstate quality: pass held-out text the model was not calibrated on, or omit --data "
                        "for the default Wikipedia paragraphs")


def _eval_windows(tokenizer, data: str | None, text_field: str | None, seq_len: int, tokens: int) -> torch.Tensor:
    from momcompress.calibration.data import default_heldout_texts, pack_tokens, read_texts

    texts = default_heldout_texts() if data in (None, "default") else read_texts(data, text_field)
    if not texts:
        raise DataError(f"the evaluation text {data or 'default'} is empty: pass --data with held-out text")
    return pack_tokens(tokenizer, texts, seq_len, tokens)  # (S, L); DataError when not one window


def _bytes_ratio(ratio: float, table_dtype: str | None, dtype: torch.dtype) -> float | None:
    """FFN bytes a token reads over dense's when the frozen FFN tables are narrower than the model (freeze
    --table-dtype), else None (the parameter ratio says it all)."""
    tables = getattr(torch, table_dtype, None) if table_dtype else None
    if tables is None or tables.itemsize >= dtype.itemsize:
        return None
    return ratio * tables.itemsize / dtype.itemsize


def method_name(manifest: dict) -> str:
    """The method a frozen folder holds: its manifest's "method", else "mom" for `freeze` output."""
    if manifest.get("method"):
        return str(manifest["method"])
    stage = manifest.get("stage")
    return "mom" if stage in (None, "freeze") else str(stage)


# ----------------------------------------------------------------------------- measurements


class _FFNRecorder:
    """Forward hooks on every FrozenMoMFFN: per layer, the summed fraction of blocks read (track_stats) and
    how often each expert is picked, over all tokens seen."""

    def __init__(self, model):
        from momcompress.baselines.base import sparse_layers

        self.layers = sparse_layers(model)  # FrozenMoMFFN, or TealFFN for the TEAL and WINA baselines (no router)
        L = len(self.layers)
        E = getattr(self.layers[0], "num_experts", 0) if L else 0
        self.ratio_sum = torch.zeros(L, dtype=torch.float64)
        self.usage = torch.zeros(L, E, dtype=torch.float64)
        self.tokens = 0
        self.handles = []

    def _hook(self, index: int):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])  # (T, d)
            if hasattr(module, "route"):
                _, top_i = module.route(x)  # (T, k): the experts forward() used
                self.usage[index] += torch.bincount(top_i.reshape(-1), minlength=module.num_experts).double().cpu()
            self.ratio_sum[index] += module.last_ratio.double().sum().cpu()
            if index == 0:
                self.tokens += x.shape[0]

        return hook

    def __enter__(self):
        for i, m in enumerate(self.layers):
            m.track_stats = True
            self.handles.append(m.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for m in self.layers:
            m.track_stats, m.last_ratio = False, None


def _perplexity(model, seqs: torch.Tensor, batch_size: int, desc: str, progress: bool) -> float:
    """metrics.perplexity over seqs, batch by batch with a progress bar (windows have equal length)."""
    from momcompress.metrics import perplexity

    nll, count = 0.0, 0
    for start in tqdm(range(0, len(seqs), batch_size), desc=desc, unit="batch", file=sys.stderr,
                      disable=not progress, dynamic_ncols=True):
        batch = seqs[start : start + batch_size]
        n = batch[:, 1:].numel()
        nll += math.log(perplexity(model, batch, batch_size)) * n
        count += n
    return math.exp(nll / count)


def average_retention(per_task: dict, metric: str) -> float:
    """Mean over tasks of the per-task retention (sparse / dense accuracy) of `metric`; tasks whose dense
    accuracy is 0 (retention undefined) are left out; NaN when no task has one."""
    values = [t["retention"][metric]["value"] for t in per_task.values()]
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def _memo(cache: dict | None, key: tuple, compute):
    """compute(), or its earlier result for the same key when a cache dict is given (see validate's dense_cache)."""
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def _zero_shot(dense, sparse, tokenizer, names: list[str], docs: dict, batch_size: int, progress: bool,
               dense_cache: dict | None = None, dense_key: tuple = ()) -> dict:
    per_task = {}
    for name in names:
        def score(model, label):
            if progress:
                print(f"zero-shot {name} ({len(docs[name])} docs): {label}", file=sys.stderr)
            return tasks.score_docs(model, tokenizer, docs[name], batch_size=batch_size, progress=progress)

        doc_key = hashlib.sha256(repr(docs[name]).encode()).hexdigest() if dense_cache is not None else ""
        results = {"dense": _memo(dense_cache, (*dense_key, "zero-shot", name, doc_key), lambda: score(dense, "dense")),
                   "sparse": score(sparse, "sparse")}
        acc = {label: tasks.task_accuracy(r) for label, r in results.items()}
        retention = {}
        for metric in tasks.METRICS:
            value, lo, hi = tasks.retention_with_ci(results["sparse"], results["dense"], metric)
            retention[metric] = {"value": value, "ci_low": lo, "ci_high": hi}
        per_task[name] = {
            "n": acc["dense"]["n"],
            "dense": {m: acc["dense"][m] for m in tasks.METRICS},
            "sparse": {m: acc["sparse"][m] for m in tasks.METRICS},
            "retention": retention,
        }
    average = {}
    if per_task:
        for label in ("dense", "sparse"):
            average[label] = {m: sum(t[label][m] for t in per_task.values()) / len(per_task) for m in tasks.METRICS}
        average["retention"] = {m: average_retention(per_task, m) for m in tasks.METRICS}
    return {"tasks": per_task, "average": average, "retention_metric": RETENTION_METRIC,
            "definition": ZERO_SHOT_DEFINITION}


def _speed_tokens(seqs: torch.Tensor, need: int) -> torch.Tensor:
    flat = seqs.reshape(-1)  # real text; repeated when the evaluation set is shorter than the timing prompt
    return flat.repeat(-(-need // flat.numel()))[:need]


def _torch_speed(dense, sparse, tokens, prefill, decode, repeats, device: torch.device, progress,
                 threads: int | None) -> dict:
    bar = tqdm(total=repeats + speed.DEFAULT_WARMUP, desc=f"speed torch {device.type}", unit="round", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        result = speed.time_torch({"dense": dense, "sparse": sparse}, tokens, prefill, decode, repeats, bar,
                                  threads=threads, label=f"torch {device.type}")
    finally:
        bar.close()
    if device.type != "cpu":
        result["gpu"] = torch.cuda.get_device_name(device)
    return result


def _onnx_speed(onnx_dense, onnx_sparse, dense, sparse, config, tokens, prefill, decode, repeats, progress,
                threads: int | None) -> dict:
    from momcompress.export.causal_lm import kv_shape

    runners = {"dense": speed.open_onnx(onnx_dense, threads, kv_shape(config)),
               "sparse": speed.open_onnx(onnx_sparse, threads, kv_shape(config))}
    bar = tqdm(total=repeats + speed.DEFAULT_WARMUP, desc="speed onnxruntime cpu", unit="round", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        result = speed.time_onnx(runners, tokens, prefill, decode, repeats, bar, label="onnxruntime cpu")
    finally:
        bar.close()
    check = tokens[: min(32, len(tokens))]
    result["max_abs_logit_diff_vs_torch"] = {
        "dense": speed.onnx_logits_diff(runners["dense"], dense, check),
        "sparse": speed.onnx_logits_diff(runners["sparse"], sparse, check),
    }
    result["exports"] = {name: {"path": str(r.path), "manifest": r.manifest} for name, r in runners.items()}
    # which path ran the MoMExperts nodes: the compiled kernel (momcompress build-ops) or the function body
    result["experts_path"] = {name: r.experts_path for name, r in runners.items()}
    result["custom_op"] = runners["sparse"].custom_op  # MoMExperts, or SelectFFN for a per-token selector
    result["long_calls"] = getattr(runners["sparse"], "long_calls", None)  # selector calls above the row switch: amx / matmul
    result["row_switch_removed"] = getattr(runners["sparse"], "row_switch_removed", False)  # the session ran no If nodes
    result["ops_library"] = next((str(r.ops_library) for r in runners.values() if r.ops_library), None)
    return result


# ----------------------------------------------------------------------------- the stage


def validate(
    frozen_dir: str | os.PathLike,
    dense: str | os.PathLike = "default",
    output: str | os.PathLike | None = None,
    data: str | None = None,
    text_field: str | None = None,
    task_names=DEFAULT_TASKS,
    limit: int | None = DEFAULT_LIMIT,
    heldout_tokens: int = DEFAULT_HELDOUT_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    context: int | None = None,
    min_retention: float | None = None,
    device: str = "auto",
    batch_size: int = 8,
    measure_speed: bool = True,
    prefill_tokens: int = 128,
    decode_tokens: int = 16,
    speed_repeats: int = 5,
    onnx_dense: str | os.PathLike | None = None,
    onnx_sparse: str | os.PathLike | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    dense_cache: dict | None = None,
) -> dict:
    """Validate FROZEN_DIR against its dense MODEL and write the report; return the report dict.

    Args:
        frozen_dir: a folder written by `momcompress freeze` (or `baseline`).
        dense: the dense original: a model folder, a .gguf file or "default".
        output: report folder (default: FROZEN_DIR's parent / "validation"); several methods validated into
            one folder share its index, comparison table and retention-vs-ratio plot.
        data: held-out text for perplexity (default: the Wikipedia paragraphs); never the calibration text.
        text_field: the field holding the text in .jsonl / .parquet / datasets data.
        task_names: zero-shot tasks (names of tasks.TASKS, a list or comma-separated; "none" for none).
        limit: documents per task (0 or None: all).
        heldout_tokens: tokens of held-out text for perplexity (whole windows).
        seq_len: window length for perplexity.
        context: context length the attention FLOPs assume (default: seq_len).
        min_retention: raise RetentionBelowThresholdError, after writing the report, when the average
            zero-shot retention (acc_norm) is below it.
        device: "auto", "cpu", "cuda" or "cuda:N".
        batch_size: windows / zero-shot requests per forward pass.
        measure_speed: time prefill and decode (PyTorch, and onnxruntime when an ONNX export is given).
        prefill_tokens, decode_tokens, speed_repeats: the timed prompt, decode steps and rounds.
        onnx_sparse: the folder (or model.onnx) `momcompress export` wrote for FROZEN_DIR; its latency is
            compared in onnxruntime with the dense model's export.
        onnx_dense: the dense model's export; default: exported once into the momcompress cache with the
            same settings (validate/dense_onnx.py).
        threads: intra-op threads pinned for every timing, both runtimes (default: torch's count).
        overwrite: replace this method's earlier report in the same folder.
        progress: tqdm bars and progress lines on stderr.
        dense_cache: a dict shared by several validate calls (benchmarks/experiment.py passes one): the dense
            model's perplexity and zero-shot scores are computed once per dense model, dtype, device, batch
            size, held-out windows and documents, and reused by the next call instead of recomputed.

    Raises:
        ModelLoadError: FROZEN_DIR is not frozen, or MODEL's architecture or tokenizer differs.
        DataError: unknown task, empty evaluation text, or --data is the calibration text.
        ConfigError: bad option values.
        RunDirError: this method's report exists and overwrite is False.
        RetentionBelowThresholdError: min_retention not met (the report is written first).
    """
    from transformers import AutoTokenizer

    from momcompress.learn.distributed import local_device
    from momcompress.models import load_model, model_fingerprint, read_config, resolve_model_dir
    from momcompress.runtime.load import load

    t_start = time.time()
    for name, value, low in (("batch_size", batch_size, 1), ("heldout_tokens", heldout_tokens, 1), ("seq_len", seq_len, 2),
                             ("prefill_tokens", prefill_tokens, 1), ("decode_tokens", decode_tokens, 1),
                             ("speed_repeats", speed_repeats, 1)):
        if value < low:
            raise ConfigError(f"{name} must be at least {low}, got {value}")
    if min_retention is not None and not 0 < min_retention <= 2:
        raise ConfigError(f"min_retention must be in (0, 2], got {min_retention}")
    if onnx_dense is not None and onnx_sparse is None:
        raise ConfigError("--onnx-dense needs --onnx (the export of FROZEN_DIR) to compare with")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    limit = limit or None
    context = context or seq_len

    # 1. inputs, checked before any long work
    frozen_path = Path(frozen_dir)
    frozen_config, manifest = _read_frozen(frozen_path)
    names = parse_tasks(task_names)
    if min_retention is not None and not names:
        raise ConfigError("--min-retention gates on zero-shot retention: select at least one task with --tasks")
    docs = {name: tasks.load_task(name, limit) for name in names}  # DataError names the available tasks
    dense_dir = resolve_model_dir(dense)
    check_same_model(frozen_config, read_config(dense_dir), frozen_path, dense_dir, manifest.get("source_model"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(frozen_path)
        dense_tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load a tokenizer ({e}); both folders need their tokenizer files") from None
    check_same_tokenizer(tokenizer, dense_tokenizer, frozen_path, dense_dir)
    learn_manifest = _learn_manifest(manifest)
    _check_not_calibration(data, learn_manifest)
    seqs = _eval_windows(tokenizer, data, text_field, seq_len, heldout_tokens)  # (S, L)
    if measure_speed and onnx_sparse is not None and onnx_dense is None:
        from momcompress.validate.dense_onnx import cached_dense_export, read_export_manifest

        onnx_dense = cached_dense_export(dense_dir, read_export_manifest(onnx_sparse))

    method = method_name(manifest)
    root = Path(output) if output is not None else frozen_path.resolve().parent / "validation"
    key = report_files.method_key(root, frozen_path, overwrite)

    notes = []
    if limit:
        notes.append(f"zero-shot accuracy on the first {limit} documents of each task (default {DEFAULT_LIMIT}, to keep "
                     "a CPU run short; --limit 0 scores the full sets); confidence intervals widen as n shrinks")
    # sha256 of the dense weights, read once: for the note below and the dense_cache key
    dense_hash = model_fingerprint(dense_dir) if manifest.get("source_model_hash") or dense_cache is not None else None
    if manifest.get("source_model_hash") and dense_hash != manifest["source_model_hash"]:
        notes.append(f"the dense model {dense_dir} has the frozen model's architecture and tokenizer but not the weights "
                     "it was frozen from (sha256 differs from the frozen manifest)")
    learn_data = ((learn_manifest or {}).get("config") or {}).get("data")
    if manifest.get("heldout_tokens") and data in (None, "default") and learn_data in (None, "default"):
        notes.append(f"freeze fitted its gate threshold on calibration text, not on these Wikipedia paragraphs; it reported "
                     f"its held-out ratio and perplexity on their first {manifest['heldout_tokens']} tokens, on which nothing "
                     "was fitted or trained")

    # 2. models and perplexity, with the MoM layers' statistics
    dev = local_device(device)
    sparse = load(frozen_path, device=dev)
    dtype = sparse.get_input_embeddings().weight.dtype
    dense_model, _ = load_model(dense_dir, dtype=dtype, device=dev)
    shape = cost.ModelShape.from_model(dense_model)
    # everything the dense results depend on besides the windows and documents (keyed below)
    dense_key, seqs_key = (), ""
    if dense_cache is not None:
        dense_key = (str(dense_dir.resolve()), dense_hash, str(dtype), str(dev), batch_size)
        seqs_key = hashlib.sha256(seqs.numpy().tobytes()).hexdigest() + str(tuple(seqs.shape))
    ppl_dense = _memo(dense_cache, (*dense_key, "perplexity", seqs_key),
                      lambda: _perplexity(dense_model, seqs, batch_size, "perplexity dense", progress))
    with _FFNRecorder(sparse) as rec:
        ppl_sparse = _perplexity(sparse, seqs, batch_size, "perplexity sparse", progress)
    if rec.tokens == 0:
        raise DataError("no evaluation tokens reached the MoM layers: pass --data with more text")
    ratio_per_layer = (rec.ratio_sum / rec.tokens).tolist()
    usage = (rec.usage / rec.tokens).tolist()  # (L, E): each row sums to top_k
    section = frozen_config.momcompress
    from momcompress.baselines.base import THRESHOLD_METHODS

    # TEAL / WINA and the per-token selector read a measured fraction of each FFN, no blocks: cost = ratio x FFN
    by_ratio = section.get("method") in THRESHOLD_METHODS or section.get("selector") == "activations"
    blocks_read = None if by_ratio else [r * section["num_blocks"] for r in ratio_per_layer]

    # 3. zero-shot
    zero_shot = _zero_shot(dense_model, sparse, tokenizer, names, docs, batch_size, progress, dense_cache, dense_key)

    # 4. cost and speed
    dense_cost = cost.dense_cost(shape, context)
    if by_ratio:
        from momcompress.baselines.base import sparse_layers

        selector = sum(m.selector_params() for m in sparse_layers(sparse))  # the selector's own reads (thresholds, scales)
        sparse_cost = cost.ratio_cost(shape, ratio_per_layer, context, selector)
    else:
        sparse_cost = cost.mom_cost(shape, blocks_read, section["block_size"], section["num_experts"], context)
    speed_report: dict = {}
    if measure_speed:
        timing_tokens = _speed_tokens(seqs, prefill_tokens + decode_tokens)
        speed_report["torch"] = {dev.type: _torch_speed(dense_model, sparse, timing_tokens, prefill_tokens, decode_tokens,
                                                        speed_repeats, dev, progress, threads)}
        if dev.type == "cpu" and torch.cuda.is_available():
            gpu = torch.device("cuda")
            dense_model.to(gpu), sparse.to(gpu)
            speed_report["torch"]["cuda"] = _torch_speed(dense_model, sparse, timing_tokens, prefill_tokens,
                                                         decode_tokens, speed_repeats, gpu, progress, threads)
            dense_model.to(dev), sparse.to(dev)
        elif dev.type != "cpu":
            notes.append("PyTorch CPU latency not measured: the models ran on the GPU (--device cpu times the CPU)")
        if onnx_sparse is not None:
            speed_report["onnxruntime"] = {"cpu": _onnx_speed(onnx_dense, onnx_sparse, dense_model, sparse, frozen_config,
                                                              timing_tokens, prefill_tokens, decode_tokens, speed_repeats,
                                                              progress, threads)}
        else:
            speed_report["onnxruntime"] = {"skipped": "no ONNX export given (--onnx FOLDER, from `momcompress export`)"}
        for runtime in ("torch", "onnxruntime"):
            for result in speed_report[runtime].values():
                for warning in result.get("warnings", []) if isinstance(result, dict) else []:
                    log.warning("%s", warning)
                    notes.append(f"unstable timing: {warning}")
        notes.append("latency is the median of interleaved rounds (min-max in brackets) on a possibly shared machine: "
                     "compare the ratios, not the absolute times")
    else:
        speed_report["skipped"] = "--no-speed"

    # 5. report
    avg_retention = zero_shot["average"].get("retention", {}).get(RETENTION_METRIC) if names else None
    report = {
        "stage": "validate",
        "momcompress_version": __version__,
        "versions": library_versions(),
        "cpu": cpu_name(),  # latency depends on it (AMX / AVX512)
        "method": method,
        "key": key,
        "frozen_dir": str(frozen_path.resolve()),
        "report_dir": str((root / key).resolve()),
        "dense_model": str(dense_dir.resolve()),
        "settings": {
            "device": str(dev), "dtype": str(dtype).replace("torch.", ""), "tasks": names, "limit": limit,
            "heldout_tokens": int(seqs.numel()), "seq_len": seq_len, "context": context, "batch_size": batch_size,
            "data": data or "default (Wikipedia paragraphs, BoolQ validation passages)",
            "min_retention": min_retention,
        },
        "perplexity": {"dense": ppl_dense, "sparse": ppl_sparse, "retention": ppl_dense / ppl_sparse,
                       "tokens": int(seqs.numel()), "windows": int(seqs.shape[0]), "seq_len": seq_len,
                       "definition": PERPLEXITY_DEFINITION},
        "zero_shot": zero_shot,
        "activation_ratio": {
            "measured": sum(ratio_per_layer) / len(ratio_per_layer), "per_layer": ratio_per_layer,
            "blocks_read_per_layer": blocks_read, "tokens": rec.tokens, "num_blocks": section.get("num_blocks"),
            "frozen_manifest": manifest.get("measured_ratio"), "target": section.get("target"),
            "table_dtype": section.get("table_dtype"),
            "bytes_ratio": _bytes_ratio(sum(ratio_per_layer) / len(ratio_per_layer), section.get("table_dtype"), dtype),
            "definition": "fraction of FFN blocks (parameters) a token reads, shared plus the union of its top-k "
                          "experts' routed blocks, averaged over the perplexity tokens and the layers",
        },
        "expert_usage": {"per_layer": usage, "top_k": section.get("top_k", 0), "num_experts": section.get("num_experts", 0),
                         "tokens": rec.tokens},
        "cost": {"dense": dense_cost.to_dict(), "sparse": sparse_cost.to_dict(), "context": context,
                 "params_ratio": sparse_cost.params / dense_cost.params,
                 "flops_ratio": sparse_cost.flops / dense_cost.flops,
                 "definition": cost.__doc__.split("Example::")[0].strip()},
        "speed": speed_report,
        "gate": {"min_retention": min_retention, "average_zero_shot_retention": avg_retention,
                 "metric": RETENTION_METRIC,
                 "passed": None if min_retention is None else bool(avg_retention is not None and
                                                                   math.isfinite(avg_retention) and
                                                                   avg_retention >= min_retention)},
        "notes": notes,
        "blocks": manifest.get("blocks"),
        "run_dir": manifest.get("run_dir"),
    }
    report["wall_seconds"] = time.time() - t_start
    report_files.write_report(root, key, report)
    log.info("wrote %s", root / key)

    if report["gate"]["passed"] is False:
        shown = "undefined (dense accuracy 0)" if not math.isfinite(avg_retention) else f"{avg_retention:.3f}"
        raise RetentionBelowThresholdError(
            f"average zero-shot retention ({RETENTION_METRIC}) {shown} is below --min-retention {min_retention}; "
            f"the report is in {root / key}", report)
    return report
