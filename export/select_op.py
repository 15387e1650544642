"""The `momcompress::SelectFFN` ONNX node: the per-token selector FFN of a frozen model, one node per layer.

DESIGN.md, "Per-token selection" and "Export". The node

    out = SelectFFN(x, x_threshold, gate_up, down, h_threshold)
      x (T, d) FFN input; x_threshold (d,) fp32; gate_up (d, 2F') gate and up transposed, interleaved per
      neuron (column 2i: neuron i's gate, 2i + 1: its up); down (F', d); h_threshold (F',) fp32;
      gate_up and down in x's type, or 16-bit in an fp32 model (freeze --table-dtype: the kernel reads them as
      they are, half the bytes; the function body and the MatMul branch below widen them first)
      attributes: activation ("silu" | "gelu_tanh" | "gelu"), plugin_namespace, plugin_version
    x_s = x * (|x| > x_threshold); (g, u) = x_s @ gate_up; h = act(g) * u; out = (h * (|h| > h_threshold)) @ down

is `torch.ops.momcompress.select_ffn` (kernels/select_op.py). The export puts each node in an If on the
token count (route_by_tokens, below): few tokens run the node, many run standard MatMuls around a
SelectHidden node (the activation and neuron threshold, fused when the library is registered). It carries a model-local function body of
standard ops (the masked-dense form: every row multiplied, the dropped inputs zeroed), so onnxruntime,
its CUDA provider and TensorRT's parser run the file as it is; a compiled kernel registered for the node
(onnxruntime custom op) reads only the kept rows. The thresholds compare in fp32 whatever the model dtype.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from momcompress.export.op import DOMAIN, DOMAIN_VERSION, PLUGIN_NAMESPACE, PLUGIN_VERSION, _activation_nodes, _const

OP_TYPE = "SelectFFN"
INPUT_NAMES = ("x", "x_threshold", "gate_up", "down", "h_threshold")
ATTRIBUTES = ("activation", "plugin_namespace", "plugin_version")


def register_schema() -> None:
    """Register the SelectFFN schema with onnx (once): torch.onnx's translation needs it to emit the node."""
    from onnx import defs

    if defs.has(OP_TYPE, DOMAIN):
        return
    Param = defs.OpSchema.FormalParameter
    inputs = [
        Param("x", "T", "(T, d) FFN input"),
        Param("x_threshold", "tensor(float)", "(d,) channel j is read when |x_j| > x_threshold[j]"),
        Param("gate_up", "W", "(d, 2F') gate and up weights transposed, interleaved per neuron"),
        Param("down", "W", "(F', d) down projection transposed"),
        Param("h_threshold", "tensor(float)", "(F',) neuron i is read when |h_i| > h_threshold[i]"),
    ]
    Attr, A = defs.OpSchema.Attribute, defs.OpSchema.AttrType
    schema = defs.OpSchema(
        OP_TYPE, DOMAIN, DOMAIN_VERSION, "Per-token selector FFN of a frozen momcompress model.",
        inputs=inputs,
        outputs=[Param("out", "T", "(T, d) FFN output")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "model dtype"),
                          ("W", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
                           "table dtype: the model's, or 16-bit in an fp32 model (freeze --table-dtype)")],
        attributes=[
            Attr("activation", A.STRING, "silu, gelu_tanh or gelu", required=False),
            Attr("plugin_namespace", A.STRING, "TensorRT plugin namespace", required=False),
            Attr("plugin_version", A.STRING, "TensorRT plugin version", required=False),
        ],
    )
    defs.register_schema(schema)


def translation_table() -> dict:
    """torch.onnx custom_translation_table entry: torch.ops.momcompress.select_ffn -> one SelectFFN node."""
    import onnxscript
    import torch

    import momcompress.kernels.select_op  # noqa: F401  registers torch.ops.momcompress.select_ffn

    register_schema()
    opset = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

    def select_ffn(x, x_threshold, gate_up, down, h_threshold, activation: str):
        return opset.SelectFFN(
            x, x_threshold, gate_up, down, h_threshold,
            activation=activation, plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
        )

    return {torch.ops.momcompress.select_ffn.default: select_ffn}


def iter_nodes(graph: onnx.GraphProto):
    """Every node of graph and of its subgraphs (If branches, loop bodies), depth first in graph order."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_nodes(g)


def select_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The SelectFFN nodes of the model (main graph, or the token-count If branches of route_by_tokens), in graph order."""
    return [n for n in iter_nodes(model.graph) if n.domain == DOMAIN and n.op_type == OP_TYPE]


# -- routing by token count -----------------------------------------------------------------------------
# A call with few tokens (decode) gains from reading only each token's kept rows; with many tokens the union
# of their rows is nearly every row, and onnxruntime's own MatMul (its weights packed once per session)
# beats any row reader. So each layer's SelectFFN node sits in an If on the token count:
#     T <= momcompress_select_row_tokens: SelectFFN (the compiled kernel reads rows; else its body)
#     otherwise: x_s = x * (|x| > x_threshold); MatMul(x_s, gate_up); SelectHidden; MatMul(h_s, down)
# Both branches compute the same formula. The switch is an initializer: a session may replace it
# (SessionOptions.add_initializer) without re-exporting.
HIDDEN_OP = "SelectHidden"
ROW_TOKENS_NAME = "momcompress_select_row_tokens"
# Measured with benchmarks/bench_ort_select.py (30 layers of the default model at 0.5, 2 threads, 2026-12-03,
# Intel Xeon with AMX): the kernel's rows took 0.18x dense at 1 token, 0.62x at 2, 0.90x at 3 and 1.10x at 4,
# the MatMul branch 1.01x from 1 to 4 tokens.
DEFAULT_ROW_TOKENS = 3


def register_hidden_schema() -> None:
    """Register the SelectHidden schema with onnx (once), for the checker."""
    from onnx import defs

    if defs.has(HIDDEN_OP, DOMAIN):
        return
    Param = defs.OpSchema.FormalParameter
    Attr, A = defs.OpSchema.Attribute, defs.OpSchema.AttrType
    defs.register_schema(defs.OpSchema(
        HIDDEN_OP, DOMAIN, DOMAIN_VERSION, "h = act(gate) * up from interleaved (T, 2F') products, zeroed where |h| <= h_threshold.",
        inputs=[Param("gu", "T", "(T, 2F') gate and up products, interleaved per neuron"),
                Param("h_threshold", "tensor(float)", "(F',) neuron i is kept when |h_i| > h_threshold[i]")],
        outputs=[Param("h", "T", "(T, F') kept hidden activations")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "model dtype")],
        attributes=[Attr("activation", A.STRING, "silu, gelu_tanh or gelu", required=False)],
    ))


def hidden_function(activation: str, opset: int) -> onnx.FunctionProto:
    """The model-local function ("momcompress", "SelectHidden") with standard ops."""
    nodes = _hidden_nodes(activation, opset, "h")
    return helper.make_function(
        DOMAIN, HIDDEN_OP, inputs=["gu", "h_threshold"], outputs=["h"], nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=["activation"],
        doc_string=f"SelectHidden ({activation}); see momcompress/export/select_op.py",
    )


def _routed(node: onnx.NodeProto, index: int, elem_type: int, table_type: int) -> list[onnx.NodeProto]:
    """[Shape, Squeeze, LessOrEqual, If] computing node's output by token count (see the section comment).
    elem_type: x's; table_type: gate_up's and down's (16-bit tables in an fp32 model are widened for the MatMuls:
    a Cast of an initializer, which onnxruntime folds once per session)."""
    n = helper.make_node
    x, x_thr, gate_up, down, h_thr = node.input
    out = node.output[0]
    p = f"select{index}_"
    activation = next((a.s.decode() for a in node.attribute if a.name == "activation"), "silu")
    then_node = onnx.NodeProto()
    then_node.CopyFrom(node)
    del then_node.output[:]
    then_node.output.append(p + "rows_out")
    then_node.name = p + "rows"
    then_branch = helper.make_graph([then_node], p + "rows", [], [helper.make_tensor_value_info(p + "rows_out", elem_type, None)])
    widen = []
    if table_type != elem_type:
        widen = [n("Cast", [gate_up], [p + "gate_up_wide"], to=elem_type, name=p + "gate_up_wide"),
                 n("Cast", [down], [p + "down_wide"], to=elem_type, name=p + "down_wide")]
        gate_up, down = p + "gate_up_wide", p + "down_wide"
    else_nodes = [
        *widen,
        n("Abs", [x], [p + "x_abs"], name=p + "x_abs"),
        *([n("Cast", [p + "x_abs"], [p + "x_abs32"], to=TensorProto.FLOAT, name=p + "x_abs32")] if elem_type != TensorProto.FLOAT else []),
        n("Greater", [p + ("x_abs32" if elem_type != TensorProto.FLOAT else "x_abs"), x_thr], [p + "x_keep"], name=p + "x_keep"),
        n("Cast", [p + "x_keep"], [p + "x_keep_x"], to=elem_type, name=p + "x_keep_x"),  # (onnxruntime's Where is slower)
        n("Mul", [x, p + "x_keep_x"], [p + "xs"], name=p + "xs"),
        n("MatMul", [p + "xs", gate_up], [p + "gu"], name=p + "gate_up"),
        n(HIDDEN_OP, [p + "gu", h_thr], [p + "h"], domain=DOMAIN, activation=activation, name=p + "hidden"),
        n("MatMul", [p + "h", down], [p + "dense_out"], name=p + "down"),
    ]
    else_branch = helper.make_graph(else_nodes, p + "dense", [], [helper.make_tensor_value_info(p + "dense_out", elem_type, None)])
    return [
        n("Shape", [x], [p + "t1"], start=0, end=1, name=p + "tokens"),
        n("Squeeze", [p + "t1"], [p + "t"], name=p + "t"),
        n("LessOrEqual", [p + "t", ROW_TOKENS_NAME], [p + "few"], name=p + "few"),
        n("If", [p + "few"], [out], then_branch=then_branch, else_branch=else_branch, name=p + "route"),
    ]


def route_by_tokens(model: onnx.ModelProto, row_tokens: int = DEFAULT_ROW_TOKENS) -> int:
    """Put each main-graph SelectFFN node in an If on its token count (in place); return how many.

    Adds the ROW_TOKENS_NAME initializer (int64 scalar); the SelectHidden function must be attached too
    (attach_function does both bodies)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    new_nodes, count = [], 0
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            gate_up = inits.get(node.input[2])
            if gate_up is None:
                raise ValueError(f"SelectFFN node {node.name}: gate_up {node.input[2]!r} is not an initializer")
            new_nodes += _routed(node, count, model_elem_type(model, gate_up.data_type), gate_up.data_type)
            count += 1
        else:
            new_nodes.append(node)
    if count:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        kept = [i for i in model.graph.initializer if i.name != ROW_TOKENS_NAME]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        model.graph.initializer.append(numpy_helper.from_array(np.array(row_tokens, dtype=np.int64), ROW_TOKENS_NAME))
    return count


def unroute(model: onnx.ModelProto) -> int:
    """Undo route_by_tokens in place: each If whose then branch is a lone SelectFFN node becomes that node (writing
    the If's output), and the token count's Shape / Squeeze / LessOrEqual that only fed it go too; return how many.

    For a session whose SelectFFN kernel runs every call itself (AMX tile products for many tokens): the If and
    its condition cost a subgraph call per layer and step."""
    producer = {o: node for node in model.graph.node for o in node.output}
    uses: dict[str, int] = {}
    for node in iter_nodes(model.graph):
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for out in model.graph.output:
        uses[out.name] = uses.get(out.name, 0) + 1
    replaced: dict[int, onnx.NodeProto] = {}
    dropped: set[int] = set()
    for node in model.graph.node:
        branch = next((a.g for a in node.attribute if a.name == "then_branch"), None) if node.op_type == "If" else None
        if branch is None or len(branch.node) != 1:
            continue
        inner = branch.node[0]
        if inner.domain != DOMAIN or inner.op_type != OP_TYPE or list(inner.output) != [branch.output[0].name]:
            continue
        lone = onnx.NodeProto()
        lone.CopyFrom(inner)
        del lone.output[:]
        lone.output.append(node.output[0])
        replaced[id(node)] = lone
        name = node.input[0]  # the condition, back through nodes that feed nothing else
        while name in producer and uses.get(name, 0) == 1 and producer[name].op_type in ("LessOrEqual", "Squeeze", "Shape"):
            dropped.add(id(producer[name]))
            name = producer[name].input[0]
    if replaced:
        nodes = [replaced.get(id(n), n) for n in model.graph.node if id(n) not in dropped]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        if not any(ROW_TOKENS_NAME in n.input for n in iter_nodes(model.graph)):
            kept = [i for i in model.graph.initializer if i.name != ROW_TOKENS_NAME]
            del model.graph.initializer[:]
            model.graph.initializer.extend(kept)
    return len(replaced)


def _hidden_nodes(activation: str, opset: int, out: str) -> list[onnx.NodeProto]:
    """gu (T, 2F') interleaved -> out (T, F') = act(g) * u, zeroed where |h| <= h_threshold (standard ops)."""
    n = helper.make_node
    return [
        _const("gu_shape", [0, -1, 2]),
        n("Reshape", ["gu", "gu_shape"], ["gu3"]),  # (T, F', 2)
        n("Split", ["gu3"], ["g3", "u3"], axis=2, num_outputs=2),
        _const("axis_last", [-1]),
        n("Squeeze", ["g3", "axis_last"], ["g"]),
        n("Squeeze", ["u3", "axis_last"], ["u"]),
        *_activation_nodes(activation, "g", "ga", opset),
        n("Mul", ["ga", "u"], ["hv"]),
        n("Abs", ["hv"], ["h_abs"]),
        n("Cast", ["h_abs"], ["h_abs32"], to=TensorProto.FLOAT),
        n("Greater", ["h_abs32", "h_threshold"], ["h_keep"]),
        n("CastLike", ["h_keep", "hv"], ["h_keep_h"]),
        n("Mul", ["hv", "h_keep_h"], [out]),
    ]


def model_elem_type(model: onnx.ModelProto, default: int) -> int:
    """The model's activation type: its first output's (logits, or a one-layer graph's out), else default."""
    elem = model.graph.output[0].type.tensor_type.elem_type if model.graph.output else 0
    return elem or default


def table_elem_type(model: onnx.ModelProto) -> int | None:
    """The SelectFFN nodes' table type (their first node's gate_up initializer), None without such nodes."""
    inits = {i.name: i.data_type for i in model.graph.initializer}
    return next((inits.get(node.input[2]) for node in select_nodes(model)), None)


def function_body(activation: str, opset: int, widen_tables: bool = False) -> onnx.FunctionProto:
    """The model-local function ("momcompress", "SelectFFN") computing the node with standard ops (masked dense);
    widen_tables: the tables are 16-bit in an fp32 model, cast to x's type before the MatMuls."""
    n = helper.make_node
    gate_up, down = ("gate_up_x", "down_x") if widen_tables else ("gate_up", "down")
    nodes = [
        *([n("CastLike", ["gate_up", "x"], [gate_up]), n("CastLike", ["down", "x"], [down])] if widen_tables else []),
        n("Abs", ["x"], ["x_abs"]),
        n("Cast", ["x_abs"], ["x_abs32"], to=TensorProto.FLOAT),
        n("Greater", ["x_abs32", "x_threshold"], ["x_keep"]),  # (T, d)
        n("CastLike", ["x_keep", "x"], ["x_keep_x"]),
        n("Mul", ["x", "x_keep_x"], ["xs"]),
        n("MatMul", ["xs", gate_up], ["gu"]),  # (T, 2F')
        *_hidden_nodes(activation, opset, "hs"),  # (T, F')
        n("MatMul", ["hs", down], ["out"]),  # (T, d)
    ]
    return helper.make_function(
        DOMAIN, OP_TYPE, inputs=list(INPUT_NAMES), outputs=["out"], nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES),
        doc_string=f"SelectFFN, masked-dense body ({activation}); see momcompress/export/select_op.py",
    )


def attach_function(model: onnx.ModelProto, activation: str) -> None:
    """Add the SelectFFN and SelectHidden function bodies to the model (in place), next to any other model-local function."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name in (OP_TYPE, HIDDEN_OP))]
    del model.functions[:]
    model.functions.extend(keep)
    tables = table_elem_type(model)
    widen = tables is not None and tables != model_elem_type(model, tables)
    model.functions.append(function_body(activation, opset, widen))
    model.functions.append(hidden_function(activation, opset))
    register_hidden_schema()
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
