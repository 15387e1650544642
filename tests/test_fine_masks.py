"""Fine masks through the whole pipeline (issue 12, item 2): block sizes 1 and 4 on a tiny llama, learned,
frozen, loaded, generated, exported with every function body and validated. Frozen equals learned
(eval-mode outputs, greedy generation) and ONNX equals PyTorch at each block size."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import momcompress
from conftest import SAMPLE_TEXT, make_tiny_model_dir
from momcompress.config import LearnConfig
from momcompress.export import op
from momcompress.export.causal_lm import OrtCausalLM, prefill_positions
from momcompress.export.checks import prompt_batch
from momcompress.freeze.freezer import load_learned, read_run, resolve_source
from momcompress.learn.mom import gate_mode
from momcompress.learn.select import set_gate_offset
from momcompress.runtime.mom_ffn import frozen_layers

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REL_TOL = 1e-5
ATOL = 1e-4


@pytest.fixture(scope="module", params=[1, 4], ids=["b1", "b4"])
def fine(request, workdir, data_file):
    """(block size, model dir, run dir, frozen dir, freeze manifest) of a tiny llama learned 4 steps."""
    b = request.param
    model_dir = make_tiny_model_dir(workdir / f"model-b{b}", "llama")
    run = workdir / f"run-b{b}"
    cfg = LearnConfig(target=0.5, selector="experts", experts=4, top_k=2, block_size=b, steps=4, batch_size=2, seq_len=32, data=str(data_file),
                      eval_tokens=256, init_tokens=256, log_every=100, tune_weights=True)
    momcompress.learn(str(model_dir), run, cfg)
    manifest = momcompress.freeze(run, workdir / f"frozen-b{b}")  # the default ±0.01: fine blocks meet it
    return b, model_dir, run, workdir / f"frozen-b{b}", manifest


def test_frozen_equals_learned(fine):
    b, _, run, frozen_dir, manifest = fine
    assert manifest["block_size"] == b and manifest["num_blocks"] == 128 // b
    assert abs(manifest["fit_ratio"] - 0.5) <= 0.01
    counts = manifest["blocks"]["total"]
    assert counts["routed"] > 0, "no routed blocks: the test would not exercise routing"
    r = read_run(run)
    learned, tok, _ = load_learned(r, resolve_source(r), torch.device("cpu"))
    set_gate_offset(learned, manifest["threshold"]["gate_offset"])
    frozen = momcompress.load(frozen_dir)
    assert all(m.block_size == b for m in frozen_layers(frozen))
    tok.padding_side = "left"
    batch = tok(["The river ran cold under the old stone bridge", "She opened the door"], return_tensors="pt", padding=True)
    with torch.no_grad(), gate_mode(learned, "deterministic"):
        want, got = learned(**batch).logits, frozen(**batch).logits
        mask = batch["attention_mask"].bool()
        assert float((got[mask] - want[mask]).abs().max() / want[mask].abs().max()) <= REL_TOL
        gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert torch.equal(frozen.generate(**batch, **gen), learned.generate(**batch, **gen))


@pytest.mark.parametrize("body", op.BODIES)
def test_onnx_equals_pytorch_for_every_body(body, fine, tmp_path):
    b, _, _, frozen_dir, _ = fine
    out = tmp_path / f"onnx-{body}"
    manifest = momcompress.export(frozen_dir, out, body=body, new_tokens=4)  # fails unless its own checks pass
    assert manifest["experts_body"] == body and all(c["ok"] for c in manifest["checks"])
    model = momcompress.load(frozen_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids, mask = prompt_batch(tok)
    pos = prefill_positions(mask)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(pos)).logits.numpy()
    lm = OrtCausalLM(out / "model.onnx")
    got, _ = lm.run(ids, mask, pos, lm.first_past(ids.shape[0]))
    assert np.abs(got - want)[mask.astype(bool)].max() <= ATOL


def test_validate_reports_the_fine_model(fine, tmp_path):
    b, model_dir, _, frozen_dir, manifest = fine
    heldout = tmp_path / "heldout.txt"
    lines = SAMPLE_TEXT.split("\n")
    heldout.write_text("\n\n".join(" ".join(lines[(3 * i + j) % len(lines)] for j in range(3)) for i in range(30)))
    report = momcompress.validate(frozen_dir, dense=model_dir, output=tmp_path / "r", data=str(heldout), task_names="none",
                                  seq_len=32, heldout_tokens=256, measure_speed=False, progress=False)
    a = report["activation_ratio"]
    assert 0 < a["measured"] < 1 and len(a["per_layer"]) == 2
    # blocks of b neurons: the cost model counts 3 * b * d parameters per block read
    assert report["cost"]["sparse"]["ffn"] < report["cost"]["dense"]["ffn"]
    assert json.loads((frozen_dir / "config.json").read_text())["momcompress"]["block_size"] == b
