"""`export`: a frozen MoM model (or a dense one) -> an ONNX causal LM with a KV cache, checked against PyTorch.

Orchestration only (the MoMExperts node and its function bodies are in op.py, the flat-cache interface
in causal_lm.py, the checks in checks.py, TensorRT in trt.py). Run it with
`momcompress export FROZEN_DIR -o OUT_DIR` (or `--dense MODEL`), or `momcompress.export(...)`.

1. Load the model (momcompress.load, or transformers for --dense), eager attention.
2. torch.onnx.export (dynamo) of FlatCacheLM with dynamic batch / sequence / past axes; the routed
   experts become one `momcompress::MoMExperts` node per layer (custom translation of the torch op).
3. Fold the shared FFN's Add into the node, attach the chosen function body, name the dynamic axes.
4. In a temporary folder: model.onnx (+ model.onnx.data over 2 GB), config, tokenizer, manifest.json;
   run the checks (onnx checker, logits with and without past, greedy generation); with --trt build
   the engine; then rename the folder into place. A failed check raises ExportCheckError, nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from momcompress import __version__
from momcompress.errors import ExportError, ModelLoadError, RunDirError
from momcompress.fsutil import atomic_dir_write

from momcompress.export import op, select_op
from momcompress.export.causal_lm import INPUT_NAMES, FlatCacheLM, kv_shape, past_names, present_names

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST_FILE = "manifest.json"
# torch.onnx's dynamo exporter emits opset 18 and newer; 18 is what onnxruntime and TensorRT 10 read best.
SUPPORTED_OPSETS = tuple(range(18, 24))
DEFAULT_OPSET = 18
PROTOBUF_LIMIT = 2 * 1024**3  # one protobuf file holds at most 2 GB: larger weights go to external data
# Dynamic axis names in the ONNX file (torch.export's symbols are renamed to these).
AXES = {"batch": "batch", "seq": "sequence", "past": "past_sequence"}


def load_for_export(model: str | os.PathLike, dense: bool):
    """(model, tokenizer, source folder) for export: a frozen folder, or with dense a dense MODEL."""
    from transformers import AutoTokenizer

    from momcompress.models import load_model, resolve_model_dir
    from momcompress.runtime.load import read_frozen_config

    if dense:
        path = resolve_model_dir(model)
        try:
            read_frozen_config(path)
        except ModelLoadError:
            pass
        else:
            raise ExportError(f"{path} is a frozen MoM model: export it without --dense")
        torch_model, tokenizer = load_model(path)
        return torch_model, tokenizer, path
    path = Path(model)
    if str(model) == "default" or path.suffix == ".gguf":
        raise ExportError(f"{model} is a dense model: export it with --dense {model}, or learn and freeze it first")
    if not path.is_dir():
        raise ExportError(f"{path} does not exist: pass a folder written by `momcompress freeze` (or a dense model with --dense)")
    if not (path / "config.json").is_file():
        raise ExportError(f"{path} is not a model folder (no config.json): pass a folder written by `momcompress freeze`, or a dense model with --dense")
    config = json.loads((path / "config.json").read_text())
    if "momcompress" not in config:
        raise ExportError(
            f"{path} is a dense model, not a frozen MoM model (config.json has no `momcompress` section): "
            f"export it as is with `momcompress export --dense {path}`, or learn and `momcompress freeze` it first"
        )
    import momcompress

    torch_model = momcompress.load(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not load the tokenizer in {path}: {exc} (freeze again; it copies the tokenizer)") from exc
    return torch_model, tokenizer, path


def check_architecture(model) -> None:
    """Raise ExportError for architectures whose cache this exporter cannot express."""
    from momcompress.models import SUPPORTED_MODEL_TYPES

    model_type = model.config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ExportError(f"architecture {model_type!r} cannot be exported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def _use_eager_attention(model) -> None:
    # Eager attention exports as MatMul/Softmax with the model's own mask (and Gemma 2's logit soft-capping).
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"


# Third-party messages that every export prints and that say nothing about the user's model, silenced so the
# checklist is what the user sees: (warning category, message regex) and loggers raised to ERROR.
KNOWN_HARMLESS_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # torch.export internals, torch 2.13
    (UserWarning, r"# The axis name: \w+ will not be used"),  # we name the dynamic axes ourselves (_name_axes)
)
KNOWN_HARMLESS_LOGGERS = ("torch.onnx._internal.exporter._registration",)  # "torchvision is not installed. Skipping ..."


@contextlib.contextmanager
def quiet_known_warnings():
    """Inside the block, drop KNOWN_HARMLESS_WARNINGS and the torchvision notices; everything else shows."""
    import warnings

    loggers = [logging.getLogger(name) for name in KNOWN_HARMLESS_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        for category, message in KNOWN_HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def to_onnx(model, opset: int = DEFAULT_OPSET, body: str = op.DEFAULT_BODY):
    """Trace model (a transformers causal LM, MoM or dense) into an onnx.ModelProto with a KV cache."""
    wrapper = FlatCacheLM(model).eval()
    L = wrapper.num_layers
    heads, head_dim = kv_shape(model.config)
    dtype = next(model.parameters()).dtype
    B, S, P = 2, 3, 5  # example sizes; all distinct and > 1 so no axis is specialised
    ids = torch.randint(3, model.config.vocab_size, (B, S))
    mask = torch.ones(B, P + S, dtype=torch.int64)
    pos = torch.arange(P, P + S).expand(B, S).contiguous()
    past = tuple(torch.randn(B, heads, P, head_dim, dtype=dtype) for _ in range(2 * L))
    Dim = torch.export.Dim
    batch, seq, past_len = Dim("batch"), Dim("seq"), Dim("past")
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: Dim.DYNAMIC},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past_len} for _ in range(2 * L)),
    }
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):  # torch.onnx prints progress on stdout
        program = torch.onnx.export(
            wrapper,
            (ids, mask, pos, *past),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            input_names=[*INPUT_NAMES, *past_names(L)],
            output_names=["logits", *present_names(L)],
            custom_translation_table={**op.translation_table(), **select_op.translation_table()},
            verbose=False,
        )
    proto = program.model_proto
    layers = len(op.mom_nodes(proto))
    selects = len(select_op.select_nodes(proto))
    if selects:
        select_op.attach_function(proto, model.config.momcompress["activation"])
        select_op.route_by_tokens(proto)
    if layers:
        fused = op.fuse_accumulate(proto)
        if fused != layers:
            raise ExportError(f"only {fused} of {layers} MoMExperts nodes could take the shared output: an exporter bug, please report it")
        activation = model.config.momcompress["activation"]
        op.attach_function(proto, body, activation)
    _name_axes(proto)
    kind = "MoM, " + body + " body" if layers else "per-token selector, masked-dense body" if selects else "dense"
    proto.doc_string = f"momcompress {__version__} export ({kind})"
    return proto


def _name_axes(proto) -> None:
    """Rename torch.export's dimension symbols in the graph's inputs and outputs to readable names."""
    names = {}
    for vi in proto.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name == "input_ids":
            names[dims[0].dim_param], names[dims[1].dim_param] = "batch", "sequence"
        elif vi.name == "attention_mask":
            names[dims[1].dim_param] = "total_sequence"
        elif vi.name == "past_key_values.0.key":
            names[dims[2].dim_param] = "past_sequence"
    for vi in [*proto.graph.input, *proto.graph.output]:
        for i, dim in enumerate(vi.type.tensor_type.shape.dim):
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
            elif dim.dim_param and vi.name.startswith("present."):
                dim.dim_param = "total_sequence"  # past + sequence
            elif dim.dim_param and vi.name == "logits" and i == 1:
                dim.dim_param = "sequence"


def save_onnx(proto, folder: Path) -> dict:
    """Write model.onnx in folder (weights in model.onnx.data when over the 2 GB protobuf limit)."""
    import onnx

    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    external = weight_bytes > PROTOBUF_LIMIT - 64 * 1024**2
    onnx.save_model(proto, folder / ONNX_FILE, save_as_external_data=external, all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
    files = [ONNX_FILE] + ([DATA_FILE] if external else [])
    return {"files": files, "external_data": external, "weight_bytes": weight_bytes, "bytes": sum((folder / f).stat().st_size for f in files)}


def _copy_model_files(source: Path, folder: Path, tokenizer) -> None:
    for name in ("config.json", "generation_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    from momcompress.models import make_config_portable, save_tokenizer

    if (folder / "config.json").is_file():
        make_config_portable(folder)  # RoPE settings transformers 4 (optimum) reads too
    save_tokenizer(tokenizer, folder)  # a tokenizer_config.json that transformers 4 (optimum) and 5 both load


def export(
    model: str | os.PathLike,
    output: str | os.PathLike,
    dense: bool = False,
    body: str = op.DEFAULT_BODY,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-5,
    new_tokens: int = 32,
    provider: str = "CPUExecutionProvider",
    trt: bool = False,
    trt_options: dict | None = None,
    trt_rtx_check: str | None = None,
) -> dict:
    """Export MODEL (a frozen folder, or with dense a dense model) to OUTPUT and return its manifest.

    Args:
        model: folder written by `momcompress freeze`; with dense, a model folder, .gguf or "default".
        output: folder to create (written under a temporary name, renamed when every check passed).
        dense: export a dense model the same way (for like-for-like comparisons).
        body: MoMExperts function body: "gather" (reads only the selected blocks), "masked-dense" (plain
            GEMMs over every routed block) or "moe" (onnxruntime's com.microsoft::MoE, one MoE expert per routed
            block; SiLU models only).
        opset: default-domain ONNX opset (18-23).
        overwrite: replace an existing OUTPUT.
        atol, rtol: values pass when |onnxruntime - PyTorch| <= atol + rtol * max|PyTorch value| (logits,
            keys/values): fp32 rounding grows with the logits' scale and the depth.
        new_tokens: greedy tokens generated through onnxruntime and PyTorch, which must be identical.
        provider: onnxruntime execution provider for the checks (CUDAExecutionProvider needs onnxruntime-gpu).
        trt: also build a TensorRT engine with the momcompress plugin (needs tensorrt and a GPU).
        trt_options: TensorRT build options (see momcompress.export.trt.TrtOptions).
        trt_rtx_check: a compute capability ("SM80", "SM86", "SM89", "SM120"): also check, with TensorRT-RTX and
            no GPU, that the graph (functions inlined) parses and builds an engine for it; the checklist says
            which nodes TensorRT-RTX refuses (needs `pip install 'momcompress[trt-rtx]'`).
    Returns:
        The manifest (also written as OUTPUT/manifest.json), with "checks": a list of {name, ok, detail}.
    """
    from momcompress.export.checks import run_checks

    t_start = time.time()
    out = Path(output)
    if out.exists() and not overwrite:
        raise RunDirError(f"output folder {out} exists: pass --overwrite to replace it, or choose another -o")
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {opset} is not supported: choose one of {SUPPORTED_OPSETS[0]}-{SUPPORTED_OPSETS[-1]} (default {DEFAULT_OPSET})")
    if body not in op.BODIES:
        raise ExportError(f"unknown experts body {body!r}: choose one of {', '.join(op.BODIES)}")
    if not (atol > 0 and rtol >= 0):
        raise ExportError(f"atol must be > 0 and rtol >= 0, got {atol}, {rtol}")
    trt_build = None
    if trt:
        from momcompress.export import trt as trt_mod

        trt_build = trt_mod.TrtOptions(**(trt_options or {}))
        trt_mod.require_tensorrt()  # before any work: says what is missing
    if trt_rtx_check is not None:
        from momcompress.export import trt as trt_mod

        if trt_rtx_check not in trt_mod.RTX_TARGETS:
            raise ExportError(f"--trt-rtx-check must be one of {', '.join(trt_mod.RTX_TARGETS)}, got {trt_rtx_check!r}")
        why = trt_mod.rtx_missing()
        if why:
            raise ExportError(f"--trt-rtx-check needs TensorRT-RTX: {why}. Nothing was written")

    torch_model, tokenizer, source = load_for_export(model, dense)
    check_architecture(torch_model)
    section = getattr(torch_model.config, "momcompress", None)
    if body == "moe" and section and section["activation"] != "silu":
        raise ExportError(
            f"--experts-body moe needs a SiLU-gated FFN (com.microsoft::MoE has no exact {section['activation']}); "
            "use --experts-body gather or masked-dense"
        )
    _use_eager_attention(torch_model)
    is_mom = hasattr(torch_model.config, "momcompress")
    selector = is_mom and section.get("selector") == "activations"
    kind = "per-token selector" if selector else "MoM, " + body + " body" if is_mom else "dense"
    log.info("exporting %s (%s) to ONNX opset %d", source, kind, opset)
    t0 = time.time()
    with quiet_known_warnings():
        proto = to_onnx(torch_model, opset, body)
    export_seconds = time.time() - t0
    L = torch_model.config.num_hidden_layers
    heads, head_dim = kv_shape(torch_model.config)
    manifest = {
        "stage": "export",
        "momcompress_version": __version__,
        "versions": _versions(),
        "source": str(Path(source).resolve()),
        "kind": "mom" if is_mom else "dense",
        "architecture": torch_model.config.model_type,
        "experts_body": body if is_mom else None,
        "opset": opset,
        "custom_domain": {"domain": op.DOMAIN, "version": op.DOMAIN_VERSION, "op_type": _custom_op_type(torch_model)} if is_mom else None,
        "plugin": {"namespace": op.PLUGIN_NAMESPACE, "version": op.PLUGIN_VERSION} if is_mom else None,
        "num_layers": L,
        "num_key_value_heads": heads,
        "head_dim": head_dim,
        "dtype": str(next(torch_model.parameters()).dtype).removeprefix("torch."),
        "inputs": [*INPUT_NAMES, *past_names(L)],
        "outputs": ["logits", *present_names(L)],
        "dynamic_axes": ["batch", "sequence", "past_sequence", "total_sequence"],
        "export_seconds": export_seconds,
    }

    def write(folder: Path) -> None:
        manifest["onnx"] = save_onnx(proto, folder)
        _copy_model_files(Path(source), folder, tokenizer)
        ran: dict = {}
        checks = run_checks(folder / ONNX_FILE, torch_model, tokenizer, atol=atol, rtol=rtol, new_tokens=new_tokens, provider=provider, info=ran)
        manifest["checks"] = [c.to_json() for c in checks]
        manifest["validation"] = {"atol": atol, "rtol": rtol, "new_tokens": new_tokens, "provider": provider, **ran}
        if trt_rtx_check is not None:
            from momcompress.export import trt as trt_mod

            manifest["tensorrt_rtx"] = trt_mod.check_rtx(folder / ONNX_FILE, kv_shape(torch_model.config), trt_rtx_check)
            manifest["checks"].append(trt_mod.rtx_check(manifest["tensorrt_rtx"], body if is_mom else None).to_json())
            if not manifest["checks"][-1]["ok"]:
                from momcompress.errors import ExportCheckError

                lines = format_checklist(manifest["checks"])
                raise ExportCheckError(f"the exported model failed the TensorRT-RTX check; nothing was written\n{lines}")
        if trt_build is not None:
            from momcompress.export import trt as trt_mod

            manifest["tensorrt"] = trt_mod.build_engine(folder, torch_model, tokenizer, trt_build, atol=atol)
            manifest["checks"] += manifest["tensorrt"].pop("checks")
        manifest["wall_seconds"] = time.time() - t_start
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))

    atomic_dir_write(out, write)
    return manifest


def _custom_op_type(model) -> str:
    """The custom node the export writes per layer: SelectFFN for a per-token selector model, else MoMExperts."""
    from momcompress.export import select_op
    from momcompress.runtime.select_ffn import select_layers

    return select_op.OP_TYPE if select_layers(model) else op.OP_TYPE


def format_checklist(checks: list[dict]) -> str:
    """One line per check: `✓ name (detail)` or `✗ name (detail)`."""
    return "\n".join(f"{'✓' if c['ok'] else '✗'} {c['name']} ({c['detail']})" for c in checks)


def _versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": sys.version.split()[0],
    }
