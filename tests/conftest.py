"""Shared fixtures: tiny models of every supported architecture, built offline from configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# model_type -> extra config fields (beyond the shared tiny sizes).
TINY_ARCHS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16, "hidden_act": "gelu_pytorch_tanh"},
    "gemma2": {"head_dim": 16, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 16, "sliding_window": 32},
    "gemma3_text": {"head_dim": 16, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 16, "sliding_window": 32},
}
VOCAB = 256


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    fields = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    fields.update(TINY_ARCHS[model_type])
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained offline on a few sentences (VOCAB entries at most)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(SAMPLE_TEXT.split("\n") * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


SAMPLE_TEXT = """The river ran cold under the old stone bridge, and the town slept.
She opened the door and looked out at the rain falling on the empty street.
A guardian angel, he said, and put the small ivory statue in her palm.
Mixtures of experts route each token to a few experts out of many.
The train left the station at noon; by evening it had crossed the mountains.
He counted the coins twice and still found one missing from the purse.
Every neuron that no token uses can be pruned without changing the output.
Wikipedia is a free online encyclopedia written by volunteers around the world."""


def load_benchmark(name: str):
    """benchmarks/<name>.py imported as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tiny_model_dir(path: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised tiny model + tokenizer as a Hugging Face folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_text_data(path: Path, repeats: int = 60) -> Path:
    """A small real-text calibration file (enough tokens for a few tiny training steps)."""
    lines = SAMPLE_TEXT.split("\n")
    body = "\n\n".join(" ".join(lines[(i + j) % len(lines)] for j in range(4)) for i in range(repeats))
    path.write_text(body)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    return write_text_data(tmp_path_factory.mktemp("data") / "calib.txt")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request) -> Path:
    """A folder shared by the tests of one module (models and runs built once per module)."""
    return tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))


@pytest.fixture(scope="module")
def data_file(workdir) -> Path:
    return write_text_data(workdir / "calib.txt")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOMCOMPRESS_CACHE", str(tmp_path / "cache"))
