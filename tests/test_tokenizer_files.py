"""Saved folders load in transformers 4 and 5: the tokenizer_config.json and config.json that freeze and
export write (momcompress.models.save_tokenizer, make_config_portable). transformers 5 saves tokenizer_class
"TokenizersBackend", which 4.x (the line optimum-onnx needs) rejects ("Tokenizer class TokenizersBackend
does not exist"), and RoPE under `rope_parameters`, which 4.x ignores (it then builds the model with its
default rope_theta, silently). The 4.x side itself runs in tests/test_optimum.py (marker `optimum`)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from conftest import tiny_config, tiny_tokenizer
from momcompress.models import (PORTABLE_TOKENIZER_CLASS, make_config_portable, portable_model_config, portable_tokenizer_config,
                                save_tokenizer)


def test_portable_config_by_hand():
    v5 = {"backend": "tokenizers", "bos_token": "<s>", "extra_special_tokens": ["<x1>", "<x2>"], "is_local": True,
          "local_files_only": False, "tokenizer_class": "TokenizersBackend", "additional_special_tokens": ["<x1>"]}
    out = portable_tokenizer_config(v5, ["input_ids", "attention_mask"])
    assert out == {"backend": "tokenizers", "bos_token": "<s>", "tokenizer_class": PORTABLE_TOKENIZER_CLASS,
                   "additional_special_tokens": ["<x1>", "<x2>"], "model_input_names": ["input_ids", "attention_mask"]}
    # a class 4.x knows, a dict of extra tokens (4.x's own form) and given input names stay as they are
    v4 = {"tokenizer_class": "LlamaTokenizerFast", "extra_special_tokens": {"image_token": "<img>"}, "model_input_names": ["input_ids"]}
    assert portable_tokenizer_config(v4, ["input_ids", "attention_mask"]) == v4


def test_saved_tokenizer_reloads_identically(tmp_path):
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<x1>", "<x2>"]})
    save_tokenizer(tok, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS and "TokenizersBackend" not in json.dumps(config)
    assert not isinstance(config.get("extra_special_tokens"), list) and config["model_input_names"] == ["input_ids", "attention_mask"]
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "<x1> The river ran cold</s>"
    assert again(text)["input_ids"] == tok(text)["input_ids"] and "token_type_ids" not in again(text)
    assert set(again.all_special_tokens) == set(tok.all_special_tokens)
    assert (again.bos_token, again.eos_token, again.pad_token) == ("<s>", "</s>", "<pad>")


def test_portable_model_config_by_hand():
    llama = {"model_type": "llama", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    assert portable_model_config(llama) == {**llama, "rope_theta": 100000.0}
    scaled = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}}
    assert portable_model_config(scaled)["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    gemma3 = {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                  "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}
    out = portable_model_config(gemma3)
    assert out["rope_theta"] == 1e6 and out["rope_local_base_freq"] == 10000.0 and "rope_scaling" not in out
    assert portable_model_config({"rope_theta": 7.0}) == {"rope_theta": 7.0}  # a transformers-4 config stays as it is


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_portable_model_config_reloads_identically(arch, tmp_path):
    """transformers 5 reads the rewritten config.json to the same RoPE settings (4.x's keys are extra)."""
    from transformers import AutoConfig

    config = tiny_config(arch, **({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}} if arch == "llama" else {}))
    config.save_pretrained(tmp_path)
    before = AutoConfig.from_pretrained(tmp_path).to_dict()
    make_config_portable(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_theta" in written
    after = AutoConfig.from_pretrained(tmp_path).to_dict()
    assert after["rope_parameters"] == before["rope_parameters"]
