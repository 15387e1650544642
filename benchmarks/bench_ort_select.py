"""The selector's FFN in onnxruntime: the export's layers with and without the compiled kernel vs dense.

Times the FFN of every layer of a per-token selector export on real inputs, in onnxruntime (CPU, fp32,
one graph per variant holding all layers' FFNs side by side, each fed the input PyTorch gives that layer
on held-out text), at several token counts T:
- dense: the original model's FFN as three MatMuls (what the dense export runs);
- body: the export's layers (an If on T: SelectFFN up to momcompress_select_row_tokens tokens, else
  MatMul + SelectHidden + MatMul) without the momcompress library: function bodies;
- kernel: the same with the library registered (what validate and the export's checks run);
- rows: the SelectFFN kernel alone, forced to read rows at any T (MOMCOMPRESS_ORT_SELECT_MAX_TOKENS=10^9);
- matmul: the export's layers with the library and the switch at 0 (every call takes the MatMul branch).
Rounds are interleaved (every variant once per round) and each cell is the median with its min-max; the
ratio is to dense. The export's switch belongs where "rows" stops beating "matmul".

    python benchmarks/bench_ort_select.py --onnx runs/smollm2-t0.5-onnx --frozen runs/smollm2-t0.5-frozen \
        [--dense default] [--tokens 1,2,4,8,16,32,128] [--rounds 7] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROWS_ONLY = str(10**9)


def layer_inputs(frozen, tokens: int) -> list[np.ndarray]:
    """The FFN input of every selector layer of the frozen model on `tokens` held-out tokens: [(tokens, d)]."""
    from transformers import AutoTokenizer

    from momcompress.calibration.data import default_heldout_texts
    from momcompress.runtime.load import load
    from momcompress.runtime.select_ffn import select_layers

    model = load(frozen).eval()
    tok = AutoTokenizer.from_pretrained(frozen)
    ids = tok(" ".join(default_heldout_texts()[:40]), return_tensors="pt")["input_ids"][:, :tokens]
    if ids.shape[1] < tokens:
        raise SystemExit(f"not enough held-out text for {tokens} tokens")
    layers = select_layers(model)
    got: list[np.ndarray] = []
    hooks = [m.register_forward_hook(lambda _m, a, _o: got.append(a[0].detach().reshape(-1, a[0].shape[-1]).float().numpy().copy()))
             for m in layers]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return got


def select_graph(onnx_dir: Path, routed: bool = True, row_tokens: int | None = None):
    """A graph of every SelectFFN node of the export, each on its own input x{i} (weights and thresholds of the
    file); routed: each in its If on the token count as in the export (switch: the file's, or row_tokens)."""
    import onnx
    from onnx import helper

    from momcompress.export import op, select_op

    file = onnx.load(str(onnx_dir / "model.onnx"))
    nodes = select_op.select_nodes(file)
    inits = {i.name: i for i in file.graph.initializer}
    d = inits[nodes[0].input[2]].dims[0]
    new_nodes, ins, outs, used = [], [], [], []
    for i, node in enumerate(nodes):
        one = helper.make_node(select_op.OP_TYPE, [f"x{i}", *node.input[1:]], [f"y{i}"], domain=op.DOMAIN)
        one.attribute.extend(node.attribute)
        new_nodes.append(one)
        ins.append(helper.make_tensor_value_info(f"x{i}", onnx.TensorProto.FLOAT, [None, d]))
        outs.append(helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, [None, d]))
        used += [inits[n] for n in node.input[1:]]
    graph = helper.make_graph(new_nodes, "select_ffns", ins, outs, initializer=used)
    body = [f for f in file.functions if f.domain == op.DOMAIN and f.name in (select_op.OP_TYPE, select_op.HIDDEN_OP)]
    model = helper.make_model(graph, opset_imports=list(file.opset_import), functions=body, ir_version=file.ir_version)
    if routed:
        if row_tokens is None:
            switch = inits.get(select_op.ROW_TOKENS_NAME)
            row_tokens = int(onnx.numpy_helper.to_array(switch)) if switch is not None else select_op.DEFAULT_ROW_TOKENS
        select_op.route_by_tokens(model, row_tokens)
    return model


def dense_graph(dense_source: str, layers: int):
    """The dense model's FFNs as standard ops (x @ gate^T, x @ up^T, silu, down), one per layer, like the dense export."""
    import onnx
    from onnx import helper, numpy_helper

    from momcompress.models import load_model, resolve_model_dir

    model, _ = load_model(resolve_model_dir(dense_source))
    if getattr(model.config, "hidden_act", "silu") != "silu":
        raise SystemExit(f"the dense FFN graph here is SiLU-gated; {dense_source} uses {model.config.hidden_act}")
    mlps = [layer.mlp for layer in model.model.layers][:layers]
    nodes, ins, outs, inits = [], [], [], []
    d = mlps[0].gate_proj.weight.shape[1]
    for i, mlp in enumerate(mlps):
        for name, w in (("g", mlp.gate_proj.weight), ("u", mlp.up_proj.weight), ("d", mlp.down_proj.weight)):
            inits.append(numpy_helper.from_array(w.detach().float().t().contiguous().numpy(), f"w{name}{i}"))
        nodes += [
            helper.make_node("MatMul", [f"x{i}", f"wg{i}"], [f"g{i}"]),
            helper.make_node("MatMul", [f"x{i}", f"wu{i}"], [f"u{i}"]),
            helper.make_node("Sigmoid", [f"g{i}"], [f"s{i}"]),
            helper.make_node("Mul", [f"g{i}", f"s{i}"], [f"a{i}"]),
            helper.make_node("Mul", [f"a{i}", f"u{i}"], [f"h{i}"]),
            helper.make_node("MatMul", [f"h{i}", f"wd{i}"], [f"y{i}"]),
        ]
        ins.append(helper.make_tensor_value_info(f"x{i}", onnx.TensorProto.FLOAT, [None, d]))
        outs.append(helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, [None, d]))
    graph = helper.make_graph(nodes, "dense_ffns", ins, outs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def session(model, threads: int, library=None, max_tokens: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if library is not None:
        options.register_custom_ops_library(str(library))
    before = os.environ.get("MOMCOMPRESS_ORT_SELECT_MAX_TOKENS")
    if max_tokens is not None:  # read by the kernel when the session creates it
        os.environ["MOMCOMPRESS_ORT_SELECT_MAX_TOKENS"] = max_tokens
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    finally:
        if max_tokens is not None:
            if before is None:
                os.environ.pop("MOMCOMPRESS_ORT_SELECT_MAX_TOKENS")
            else:
                os.environ["MOMCOMPRESS_ORT_SELECT_MAX_TOKENS"] = before


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True, help="A per-token selector model's export folder (momcompress export).")
    ap.add_argument("--frozen", required=True, help="Its frozen model folder (for the layers' real inputs).")
    ap.add_argument("--dense", default="default", help="The dense source model (folder, .gguf or 'default').")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,128", help="Token counts T per call (comma-separated).")
    ap.add_argument("--rounds", type=int, default=7, help="Interleaved rounds (median, min-max).")
    ap.add_argument("--reps", type=int, default=5, help="Calls per variant per round (their mean is one sample).")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads.")
    ap.add_argument("--json", help="Also write the results as JSON here.")
    args = ap.parse_args(argv)
    from momcompress.export import ort_ops
    from momcompress.hardware import cpu_name

    library = ort_ops.find_library()
    if library is None:
        raise SystemExit(ort_ops.missing_message("needed for the kernel columns"))
    tokens = [int(t) for t in args.tokens.split(",") if t]
    inputs = layer_inputs(args.frozen, max(tokens))
    routed = select_graph(Path(args.onnx))
    sessions = {
        "dense": session(dense_graph(args.dense, len(inputs)), args.threads),
        "body": session(routed, args.threads),
        "kernel": session(routed, args.threads, library),
        "rows": session(select_graph(Path(args.onnx), routed=False), args.threads, library, ROWS_ONLY),
        "matmul": session(select_graph(Path(args.onnx), row_tokens=0), args.threads, library),
    }
    rows = []
    for T in tokens:
        feeds = {f"x{i}": np.ascontiguousarray(x[:T]) for i, x in enumerate(inputs)}
        for s in sessions.values():  # warm-up
            s.run(None, feeds)
        samples = {name: [] for name in sessions}
        for _ in range(args.rounds):
            for name, s in sessions.items():
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    s.run(None, feeds)
                samples[name].append((time.perf_counter() - t0) / args.reps * 1e3)
        row = {"T": T}
        dense_ms = statistics.median(samples["dense"])
        for name, xs in samples.items():
            row[f"{name} ms"] = statistics.median(xs)
            row[f"{name} range"] = [min(xs), max(xs)]
            row[f"{name} ratio"] = statistics.median(xs) / dense_ms
        rows.append(row)
        print(f"T={T} done", file=sys.stderr, flush=True)
    print(f"SelectFFN node vs dense FFN, {len(inputs)} layers, onnxruntime CPU fp32, {args.threads} threads, "
          f"median of {args.rounds} rounds x {args.reps} calls; CPU: {cpu_name()}")
    names = list(sessions)
    print(f"{'T':>5} " + " ".join(f"{n + ' ms':>22}" for n in names) + "  " + " ".join(f"{n:>7}" for n in names[1:]))
    for row in rows:
        cells = " ".join(f"{row[f'{n} ms']:>8.3f} ({row[f'{n} range'][0]:.2f}-{row[f'{n} range'][1]:.2f})" for n in names)
        ratios = " ".join(f"{row[f'{n} ratio']:>6.2f}x" for n in names[1:])
        print(f"{row['T']:>5} {cells}  {ratios}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "threads": args.threads, "rounds": args.rounds,
                                               "reps": args.reps, "onnx": str(args.onnx), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
