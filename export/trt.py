"""TensorRT engine build for an exported model (`momcompress export FROZEN_DIR -o OUT --trt`).

Needs the `trt` extra (`pip install 'momcompress[trt]'`, TensorRT >= 10.9), a CUDA GPU and Triton;
`require_tensorrt` says which is missing before anything is written. Steps (DESIGN.md, "Export"):
1. register the momcompress::MoMExperts plugin (momcompress.plugins; AOT: PTX embedded in the engine);
2. strip the model-local MoMExperts functions (from TensorRT 10.15 a function would win over the
   plugin), so the ONNX parser maps each node to the plugin by op type + plugin_namespace/version;
3. parse, set precision and one optimisation profile over the batch / sequence / past ranges;
4. build and write model.engine and run_engine.py (a small runner), then check the engine's logits
   against PyTorch on the same prompts as the ONNX checks.
`tensorrt` is imported only inside these functions.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from momcompress.errors import ExportError

log = logging.getLogger(__name__)

ENGINE_FILE = "model.engine"
RUNNER_FILE = "run_engine.py"
STRIPPED_FILE = "model.trt.onnx"  # temporary: removed once the engine is built
MIN_TENSORRT = (10, 9)
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class TrtOptions:
    """Engine build options: precision and the optimisation profile's (min, opt, max) ranges."""

    precision: str = "fp16"
    batch: tuple[int, int, int] = (1, 1, 4)
    sequence: tuple[int, int, int] = (1, 128, 1024)
    past: tuple[int, int, int] = (0, 128, 1024)
    workspace_gb: float = 4.0
    implementation: str = "aot"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ExportError(f"--trt-precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("batch", "sequence", "past"):
            lo, opt, hi = getattr(self, name)
            if not (0 <= lo <= opt <= hi) or (name != "past" and lo < 1):
                raise ExportError(f"--trt-{name} must be MIN,OPT,MAX with {'0' if name == 'past' else '1'} <= MIN <= OPT <= MAX, got {lo},{opt},{hi}")


def missing_requirements() -> list[str]:
    """What --trt lacks on this machine (empty when an engine can be built)."""
    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("the tensorrt package (pip install 'momcompress[trt]')")
    else:
        # PyPI's tensorrt / tensorrt-cu12 wrappers install without TensorRT's libraries when NVIDIA's index is out of
        # reach: the package is there, its import fails (ImportError, or OSError from the shared libraries).
        try:
            import tensorrt
        except (ImportError, OSError) as exc:
            tensorrt = None
            missing.append(f"TensorRT's libraries (the tensorrt package is installed but `import tensorrt` fails: "
                           f"{str(exc).splitlines()[0][:200]}; install TensorRT itself, e.g. tensorrt-cu12 from NVIDIA's index)")
        version_string = getattr(tensorrt, "__version__", None) if tensorrt is not None else None
        if tensorrt is not None:
            try:
                version = tuple(int(p) for p in str(version_string).split(".")[:2])
            except ValueError:
                version = (0, 0)
            if version < MIN_TENSORRT:
                missing.append(f"TensorRT >= {'.'.join(map(str, MIN_TENSORRT))} (found {version_string}; pip install -U 'momcompress[trt]')")
    import torch

    if not torch.cuda.is_available():
        missing.append("a CUDA GPU visible to torch (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("triton") is None:
        missing.append("Triton (pip install 'momcompress[triton]'), which compiles the plugin's kernel")
    return missing


def require_tensorrt() -> None:
    """Raise ExportError naming everything --trt lacks here."""
    missing = missing_requirements()
    if missing:
        raise ExportError("--trt needs " + "; ".join(missing) + ". Nothing was written; export without --trt for ONNX only")


def stripped_model(onnx_path: Path):
    """The exported graph without the MoMExperts function bodies (weights left external / in place)."""
    import onnx

    from momcompress.export import op

    model = onnx.load(str(onnx_path), load_external_data=False)
    return op.strip_functions(model)


def build_engine(folder: Path, model, tokenizer, options: TrtOptions, atol: float = 1e-4) -> dict:
    """Build folder/model.engine from folder/model.onnx, write the runner, check logits; return a report."""
    import onnx
    import tensorrt as trt

    from momcompress.export.causal_lm import kv_shape
    from momcompress.plugins import register

    register(options.implementation)
    stripped = folder / STRIPPED_FILE
    # Same folder as model.onnx, so an external data file resolves by its relative location.
    onnx.save_model(stripped_model(folder / "model.onnx"), stripped)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch (the only mode in TensorRT 10)
    parser = trt.OnnxParser(network, logger)
    try:
        if not parser.parse_from_file(str(stripped)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT could not parse the exported model: {errors}")
    finally:
        os.remove(stripped)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 1024**3))
    if options.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif options.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    config.add_optimization_profile(_profile(builder, network, kv_shape(model.config), options))
    log.info("building the TensorRT engine (%s)", options.precision)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT failed to build the engine (see its log above); try --trt-precision fp32 or smaller ranges")
    (folder / ENGINE_FILE).write_bytes(bytes(serialized))
    (folder / RUNNER_FILE).write_text(RUNNER_SCRIPT)
    checks = check_engine(folder / ENGINE_FILE, model, tokenizer, atol if options.precision == "fp32" else max(atol, 5e-2))
    return {"engine": ENGINE_FILE, "runner": RUNNER_FILE, "options": asdict(options), "tensorrt": trt.__version__, "checks": checks}


def _profile(builder, network, kv: tuple[int, int], options: TrtOptions):
    """One optimisation profile over the batch / sequence / past ranges of options (kv: key/value heads, head dim)."""
    heads, head_dim = kv
    (b0, b1, b2), (s0, s1, s2), (p0, p1, p2) = options.batch, options.sequence, options.past
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name.startswith("past_key_values."):
            profile.set_shape(name, (b0, heads, p0, head_dim), (b1, heads, p1, head_dim), (b2, heads, p2, head_dim))
        elif name == "attention_mask":
            profile.set_shape(name, (b0, p0 + s0), (b1, p1 + s1), (b2, p2 + s2))
        else:  # input_ids, position_ids
            profile.set_shape(name, (b0, s0), (b1, s1), (b2, s2))
    return profile


# -- TensorRT-RTX: parse and build without a GPU ----------------------------------------------------------
RTX_TARGETS = ("SM80", "SM86", "SM89", "SM120")  # compute capabilities TensorRT-RTX builds for without a GPU
RTX_DEFAULT_TARGET = "SM89"
INLINED_FILE = "model.inlined.onnx"  # temporary, beside model.onnx (so external data resolves)


def rtx_missing() -> str | None:
    """Why the TensorRT-RTX check cannot run here (None when tensorrt_rtx imports)."""
    if importlib.util.find_spec("tensorrt_rtx") is None:
        return "TensorRT-RTX is not installed (pip install 'momcompress[trt-rtx]', i.e. tensorrt-rtx-cu12)"
    try:
        import tensorrt_rtx  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"tensorrt_rtx does not import: {str(exc).splitlines()[0][:200]}"
    return None


def check_rtx(onnx_path: Path, kv: tuple[int, int], target: str = RTX_DEFAULT_TARGET, options: TrtOptions | None = None) -> dict:
    """Parse the exported graph with TensorRT-RTX (its MoMExperts functions inlined: the gather body's standard
    ops) and build an engine for one compute capability; no GPU is needed. TensorRT-RTX has no Python plugin
    API, so this checks the function-body path, not the momcompress plugin.

    Returns:
        {"tensorrt_rtx": version, "target", "nodes": node count after inlining, "supported": the parser's verdict
        on the whole model, "refused": [{"index", "name", "op_type"}] (nodes outside every subgraph the parser
        splits the model into, and the node a full parse stops at; later nodes of a refused kind are not
        listed one by one), "parse_errors": [{"node_name", "node_operator", "desc"}], "parsed", "built",
        "engine_bytes", "seconds"}.
    """
    import time

    import onnx
    import onnx.inliner
    import tensorrt_rtx as trt

    if target not in RTX_TARGETS:
        raise ExportError(f"TensorRT-RTX target must be one of {', '.join(RTX_TARGETS)}, got {target!r}")
    options = options or TrtOptions(precision="fp16", batch=(1, 1, 2), sequence=(1, 16, 64), past=(0, 16, 64))
    t0 = time.time()
    model = onnx.load(str(onnx_path), load_external_data=False)
    inlined = onnx.inliner.inline_local_functions(model)
    tmp = Path(onnx_path).with_name(INLINED_FILE)
    onnx.save_model(inlined, tmp)
    report: dict = {"tensorrt_rtx": trt.__version__, "target": target, "nodes": len(inlined.graph.node)}
    try:
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        # Refused nodes: those the parser leaves out of every subgraph it splits the model into (it splits at
        # each node it cannot import). The parser objects keep their networks alive: a parser whose network
        # was collected crashes.
        probe_network = builder.create_network(0)
        probe = trt.OnnxParser(probe_network, logger)
        report["supported"] = bool(probe.supports_model_v2(tmp.read_bytes(), str(tmp)))
        covered = set()
        for i in range(probe.num_subgraphs):
            covered.update(probe.get_subgraph_nodes(i))
        report["refused"] = [{"index": i, "name": n.name, "op_type": n.op_type}
                             for i, n in enumerate(inlined.graph.node) if i not in covered]
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        report["parsed"] = bool(parser.parse_from_file(str(tmp)))
        report["parse_errors"] = [{"node_name": e.node_name(), "node_operator": e.node_operator(), "desc": e.desc()}
                                  for e in (parser.get_error(i) for i in range(parser.num_errors))]
        for e in report["parse_errors"]:  # the node the full parse stopped at is refused too
            if e["node_operator"] and not any(r["op_type"] == e["node_operator"] for r in report["refused"]):
                report["refused"].append({"index": None, "name": e["node_name"], "op_type": e["node_operator"]})
        report["built"], report["engine_bytes"] = False, None
        if report["parsed"]:
            config = builder.create_builder_config()
            config.num_compute_capabilities = 1
            if not config.set_compute_capability(getattr(trt.ComputeCapability, target), 0):
                raise ExportError(f"TensorRT-RTX {trt.__version__} refused compute capability {target}")
            config.add_optimization_profile(_profile(builder, network, kv, options))
            serialized = builder.build_serialized_network(network, config)
            report["built"] = serialized is not None
            report["engine_bytes"] = serialized.nbytes if serialized is not None else None
    finally:
        tmp.unlink(missing_ok=True)
    report["seconds"] = time.time() - t0
    return report


def rtx_check(report: dict, body: str | None):
    """The export checklist line of a check_rtx report (body: the MoMExperts body of the file, None for dense)."""
    from momcompress.export.checks import Check

    ok, detail = rtx_check_line(report)
    if not ok and body == "gather" and any(n["op_type"] == "NonZero" for n in report["refused"]):
        detail += " (the gather body's NonZero: export with --experts-body masked-dense for TensorRT-RTX)"
    return Check(f"TensorRT-RTX parses the graph and builds an {report['target']} engine (no GPU)", ok, detail)


def rtx_check_line(report: dict) -> tuple[bool, str]:
    """(ok, detail) of a check_rtx report for the export checklist."""
    refused = sorted({n["op_type"] for n in report["refused"]})
    ok = report["parsed"] and report["built"] and not refused
    parts = [f"TensorRT-RTX {report['tensorrt_rtx']}, {report['nodes']} nodes, functions inlined"]
    parts.append(f"refused: {', '.join(refused)}" if refused else "no node refused")
    if report["parse_errors"]:
        e = report["parse_errors"][0]
        parts.append(f"parse error at {e['node_name']} ({e['node_operator']}): {e['desc'][:200]}")
    parts.append(f"{report['target']} engine {report['engine_bytes']} bytes" if report["built"] else f"no {report['target']} engine")
    return ok, "; ".join(parts)


def check_engine(engine_path: Path, model, tokenizer, atol: float) -> list[dict]:
    """The engine's logits against PyTorch on the checks' prompts (prefill, no past)."""
    from momcompress.errors import ExportCheckError
    from momcompress.export.causal_lm import FlatCacheLM, prefill_positions
    from momcompress.export.checks import Check, prompt_batch

    runner = EngineRunner(engine_path)
    ids, mask = prompt_batch(tokenizer)
    pos = prefill_positions(mask)
    got = runner.logits(ids, mask, pos)
    lm = FlatCacheLM(model).eval()
    want, _ = lm.run(ids, mask, pos, lm.first_past(ids.shape[0]))
    diff = float(np.abs(got - want)[mask.astype(bool)].max())
    check = Check("TensorRT engine logits close", diff <= atol, f"atol {atol:g}, max diff {diff:.2e}")
    if not check.ok:
        raise ExportCheckError(f"the TensorRT engine failed its logits check; nothing was written\n{check.line()}")
    return [check.to_json()]


class EngineRunner:
    """Run a built engine with torch CUDA buffers (the same code as run_engine.py)."""

    def __init__(self, engine_path: Path):
        import tensorrt as trt

        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(engine_path).read_bytes())
        self.context = self.engine.create_execution_context()

    def logits(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        return run_engine_once(self.engine, self.context, ids, mask, pos)[0].float().cpu().numpy()


def run_engine_once(engine, context, ids, mask, pos, past=None):
    """One engine call with empty (or given) past key/values: (logits, present list) as torch CUDA tensors."""
    import tensorrt as trt
    import torch

    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    B = ids.shape[0]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    for i, name in enumerate(past_names):
        if past is not None:
            feeds[name] = past[i]
        else:
            shape = engine.get_tensor_shape(name)
            dtype = torch.float16 if engine.get_tensor_dtype(name) == trt.float16 else torch.float32
            feeds[name] = torch.zeros(B, shape[1], 0, shape[3], dtype=dtype)
    stream = torch.cuda.current_stream()
    held = {}
    for name in inputs:
        t = torch.as_tensor(feeds[name]).cuda().contiguous()
        held[name] = t
        context.set_input_shape(name, tuple(t.shape))
        context.set_tensor_address(name, t.data_ptr() if t.numel() else 0)
    outs = {}
    for name in outputs:
        dtype = {trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}.get(engine.get_tensor_dtype(name), torch.float32)
        outs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
        context.set_tensor_address(name, outs[name].data_ptr())
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    stream.synchronize()
    return outs["logits"], [outs[n] for n in outputs if n.startswith("present.")]


RUNNER_SCRIPT = '''"""Run the momcompress TensorRT engine in this folder: greedy generation from a prompt.

    python run_engine.py "The river ran" --new-tokens 32

Needs tensorrt, torch (CUDA) and transformers (for the tokenizer). The MoMExperts plugin's kernel is
embedded in the engine (AOT); if it was built with the JIT implementation, `import momcompress.plugins`
and call `momcompress.plugins.register("jit")` first.
"""

import argparse
from pathlib import Path

import tensorrt as trt
import torch
from transformers import AutoTokenizer

HERE = Path(__file__).resolve().parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("prompt")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(HERE)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine((HERE / "model.engine").read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    ids = torch.tensor([tok(args.prompt)["input_ids"]], device="cuda")
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1], device="cuda")[None]
    past = {}
    for n in inputs:
        if n.startswith("past_key_values."):
            shape = engine.get_tensor_shape(n)
            dtype = torch.float16 if engine.get_tensor_dtype(n) == trt.float16 else torch.float32
            past[n] = torch.zeros(1, shape[1], 0, shape[3], dtype=dtype, device="cuda")
    generated = []
    for _ in range(args.new_tokens):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past}
        for n in inputs:
            t = feeds[n].contiguous()
            feeds[n] = t
            context.set_input_shape(n, tuple(t.shape))
            context.set_tensor_address(n, t.data_ptr() if t.numel() else 0)
        outs = {}
        for n in outputs:
            dt = {trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}.get(engine.get_tensor_dtype(n), torch.float32)
            outs[n] = torch.empty(tuple(context.get_tensor_shape(n)), dtype=dt, device="cuda")
            context.set_tensor_address(n, outs[n].data_ptr())
        context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        nxt = outs["logits"][:, -1].argmax(-1, keepdim=True)
        generated.append(int(nxt))
        past = {n.replace("present.", "past_key_values."): outs[n] for n in outputs if n.startswith("present.")}
        ids, pos = nxt, pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    print(args.prompt + tok.decode(generated))


if __name__ == "__main__":
    main()
'''
