"""The `momcompress::SelectFFN` ONNX node: the per-token selector FFN of a frozen model, one node per layer.

DESIGN.md, "Per-token selection" and "Export". The node

    out = SelectFFN(x, x_threshold, gate_up, down, h_threshold)
      x (T, d) FFN input; x_threshold (d,) fp32; gate_up (d, 2F') gate and up transposed, interleaved per
      neuron (column 2i: neuron i's gate, 2i + 1: its up); down (F', d); h_threshold (F',) fp32
      attributes: activation ("silu" | "gelu_tanh" | "gelu"), plugin_namespace, plugin_version
    x_s = x * (|x| > x_threshold); (g, u) = x_s @ gate_up; h = act(g) * u; out = (h * (|h| > h_threshold)) @ down

is `torch.ops.momcompress.select_ffn` (kernels/select_op.py). It carries a model-local function body of
standard ops (the masked-dense form: every row multiplied, the dropped inputs zeroed), so onnxruntime,
its CUDA provider and TensorRT's parser run the file as it is; a compiled kernel registered for the node
(onnxruntime custom op) reads only the kept rows. The thresholds compare in fp32 whatever the model dtype.
"""

from __future__ import annotations

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
        Param("gate_up", "T", "(d, 2F') gate and up weights transposed, interleaved per neuron"),
        Param("down", "T", "(F', d) down projection transposed"),
        Param("h_threshold", "tensor(float)", "(F',) neuron i is read when |h_i| > h_threshold[i]"),
    ]
    Attr, A = defs.OpSchema.Attribute, defs.OpSchema.AttrType
    schema = defs.OpSchema(
        OP_TYPE, DOMAIN, DOMAIN_VERSION, "Per-token selector FFN of a frozen momcompress model.",
        inputs=inputs,
        outputs=[Param("out", "T", "(T, d) FFN output")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "model dtype")],
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


def select_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The SelectFFN nodes of the main graph, in graph order."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def function_body(activation: str, opset: int) -> onnx.FunctionProto:
    """The model-local function ("momcompress", "SelectFFN") computing the node with standard ops (masked dense)."""
    n = helper.make_node
    nodes = [
        n("Abs", ["x"], ["x_abs"]),
        n("Cast", ["x_abs"], ["x_abs32"], to=TensorProto.FLOAT),
        n("Greater", ["x_abs32", "x_threshold"], ["x_keep"]),  # (T, d)
        n("CastLike", ["x_keep", "x"], ["x_keep_x"]),
        n("Mul", ["x", "x_keep_x"], ["xs"]),
        n("MatMul", ["xs", "gate_up"], ["gu"]),  # (T, 2F')
        _const("gu_shape", [0, -1, 2]),
        n("Reshape", ["gu", "gu_shape"], ["gu3"]),  # (T, F', 2)
        n("Split", ["gu3"], ["g3", "u3"], axis=2, num_outputs=2),
        _const("axis_last", [-1]),
        n("Squeeze", ["g3", "axis_last"], ["g"]),
        n("Squeeze", ["u3", "axis_last"], ["u"]),
        *_activation_nodes(activation, "g", "ga", opset),
        n("Mul", ["ga", "u"], ["h"]),  # (T, F')
        n("Abs", ["h"], ["h_abs"]),
        n("Cast", ["h_abs"], ["h_abs32"], to=TensorProto.FLOAT),
        n("Greater", ["h_abs32", "h_threshold"], ["h_keep"]),
        n("CastLike", ["h_keep", "h"], ["h_keep_h"]),
        n("Mul", ["h", "h_keep_h"], ["hs"]),
        n("MatMul", ["hs", "down"], ["out"]),  # (T, d)
    ]
    return helper.make_function(
        DOMAIN, OP_TYPE, inputs=list(INPUT_NAMES), outputs=["out"], nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES),
        doc_string=f"SelectFFN, masked-dense body ({activation}); see momcompress/export/select_op.py",
    )


def attach_function(model: onnx.ModelProto, activation: str) -> None:
    """Add the SelectFFN function body to the model (in place), next to any other model-local function."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
    del model.functions[:]
    model.functions.extend(keep)
    model.functions.append(function_body(activation, opset))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
