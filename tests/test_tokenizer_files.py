"""Saved tokenizers load in transformers 4 and 5: the tokenizer_config.json that freeze and export write
(momcompress.models.save_tokenizer). transformers 5 saves tokenizer_class "TokenizersBackend", which 4.x
(the line optimum-onnx needs) rejects: "Tokenizer class TokenizersBackend does not exist". The 4.x side
itself runs in tests/test_optimum.py (marker `optimum`, a second Python with transformers 4.57)."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from conftest import tiny_tokenizer
from momcompress.models import PORTABLE_TOKENIZER_CLASS, portable_tokenizer_config, save_tokenizer


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
