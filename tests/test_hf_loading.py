"""A frozen folder loads with plain transformers (`trust_remote_code=True`, the folder's own modeling file)
in a process that cannot import momcompress, and computes what `momcompress.load` computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import momcompress
from conftest import TINY_ARCHS, make_tiny_model_dir, tiny_config
from momcompress.config import LearnConfig

# Runs in a fresh interpreter, cwd a temp dir, PYTHONPATH scrubbed, momcompress blocked on the import path.
SCRIPT = textwrap.dedent(
    """
    import json, sys

    class BlockMomcompress:
        def find_spec(self, name, path=None, target=None):
            if name == "momcompress" or name.startswith("momcompress."):
                raise ImportError("momcompress is blocked in this test")

    sys.meta_path.insert(0, BlockMomcompress())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, out = sys.argv[1], sys.argv[2]
    try:
        import momcompress  # noqa: F401
        raise SystemExit("momcompress is importable: the test would prove nothing")
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(["The river ran cold under the old stone bridge", "She opened the door"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**ids).logits
        gen = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert not any(m.startswith("momcompress") for m in sys.modules), "momcompress was imported"
    mlp = type(model.model.layers[0].mlp).__name__
    json.dump({"logits": logits.tolist(), "generated": gen.tolist(), "class": type(model).__name__, "mlp": mlp}, open(out, "w"))
    """
)


def _plain_transformers(folder, tmp_path) -> dict:
    script, out = tmp_path / "load_plain.py", tmp_path / "out.json"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-s", str(script), str(folder), str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("arch,block_size,cls", [("llama", 1, "MoMLlamaForCausalLM"), ("gemma2", 4, "MoMGemma2ForCausalLM")])
def test_frozen_folder_loads_with_plain_transformers(arch, block_size, cls, workdir, data_file, tmp_path):
    model_dir = make_tiny_model_dir(workdir / f"model-{arch}", arch)
    cfg = LearnConfig(target=0.5, selector="experts", experts=4, top_k=2, block_size=block_size, steps=3, batch_size=2, seq_len=32, data=str(data_file),
                      eval_tokens=256, init_tokens=256, log_every=100, tune_weights=True)
    momcompress.learn(str(model_dir), workdir / f"run-{arch}", cfg)
    frozen = workdir / f"frozen-{arch}"
    momcompress.freeze(workdir / f"run-{arch}", frozen, tolerance=0.05)
    got = _plain_transformers(frozen, tmp_path)
    assert got["class"] == cls and got["mlp"] == "MoMFFN"

    model = momcompress.load(frozen)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(frozen)
    ids = tok(["The river ran cold under the old stone bridge", "She opened the door"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model(**ids).logits
        gen = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    logits = torch.tensor(got["logits"])
    mask = ids["attention_mask"].bool()
    assert float((logits[mask] - want[mask]).abs().max() / want[mask].abs().max()) <= 1e-5
    assert got["generated"] == gen.tolist()


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_modeling_file_builds_every_supported_family(arch):
    """Every architecture a frozen folder can come from maps to a MoM subclass of its transformers class."""
    import transformers

    from momcompress.runtime import hf_modeling

    config = tiny_config(arch)
    name = hf_modeling.model_class_name(config.model_type)
    cls = getattr(hf_modeling, name)
    base = getattr(transformers, name.removeprefix("MoM"))
    assert issubclass(cls, base) and cls.config_class is base.config_class
    config.momcompress = {
        "format_version": 2, "num_experts": 4, "top_k": 2, "block_size": 4, "num_blocks": 32, "activation": "silu",
        "layers": [{"shared": 8, "routed": 16, "pruned": 8, "routed_stored": 16, "entries": 24}] * config.num_hidden_layers,
    }
    model = cls(config)
    assert all(type(layer.mlp).__name__ == "MoMFFN" and layer.mlp.routed_gate.shape == (16, 4, 64) for layer in model.model.layers)
    assert model(torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, config.vocab_size)
    config.momcompress["format_version"] = 1
    with pytest.raises(ValueError, match="freeze it again"):
        cls(config)
