"""The `momcompress::MoMExperts` ONNX node: schema, torch.onnx translation, and its function bodies.

DESIGN.md, "Export". Per layer, the routed experts of a frozen MoM FFN are one node

    out = MoMExperts(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, accumulate)
      x (T, d) FFN input; top_w (T, k) fp32 router weights (renormalised); top_i (T, k) int64 expert ids;
      routed_gate, routed_up, routed_down (R, b, d) routed blocks (down transposed);
      expert_block_scale (E, R) fp32 gate value of block r in expert e (0: not used);
      accumulate (T, d) the shared FFN's output, added to the routed output (optional input)
      attributes: top_k, activation ("silu" | "gelu_tanh" | "gelu"), plugin_namespace, plugin_version,
        max_blocks (moe body only: the most routed blocks one token uses)
    out[t] = accumulate[t] + sum_r w[t, r] (act(x[t] Wg_r^T) * (x[t] Wu_r^T)) Wd_r,  w[t, r] = sum_j top_w[t, j] z[top_i[t, j], r]

the contract of `momcompress.kernels.routed_experts` (plus the accumulation). The node carries a
model-local ONNX function (standard ops only), so plain onnxruntime runs it; TensorRT maps it to the
plugin of `momcompress.plugins` once the function is stripped (`strip_functions`). Function bodies:
- gather: the union of the blocks any token of the call selects (NonZero + Gather), then the FFN on
  those blocks only: for one decode token it reads the blocks of its top-k experts and no other;
- masked-dense: every routed block as one dense FFN, scaled per token by w (zeros where unused):
  reads all routed weights, but is plain GEMMs;
- moe: onnxruntime's contrib op com.microsoft::MoE with one MoE expert per routed block (the blocks
  reshaped in place, no copy per expert); SiLU-gated models only; not for TensorRT's parser.
On onnxruntime CPU the routed part costs more than the weights it reads: standard ops copy the selected
blocks (Gather) before multiplying, and MoE's CPU kernel multiplies the blocks one at a time (dated
measurements: README, "ONNX bodies on onnxruntime CPU"; `benchmarks/bench_onnx.py` measures them again).
The default stays gather: standard ops (TensorRT and onnxruntime's CUDA provider take it too) and reads
only the selected blocks. On onnxruntime CPU, the compiled kernel of `momcompress build-ops`
(export/ort_ops.py, export/csrc/) replaces the body when it is registered; the file stays the same.

The second node, `momcompress::SelectedRowsFFN`, is the same computation with each token's rows given
directly (the per-token selector models, DESIGN.md "Per-token selection"):

    out = SelectedRowsFFN(x, rows, scale, gate_rows, up_rows, down_rows, accumulate)
      x (T, d) float; rows (T, K) int64 row ids (< 0: padding, skipped); scale (T, K) float;
      gate_rows, up_rows, down_rows (R, d) float / float16 / bfloat16 (down transposed: down_rows[r] = W_down[:, r]);
      accumulate (T, d) float (optional); attribute activation ("silu" | "gelu_tanh" | "gelu")
    out[t] = accumulate[t] + sum_k scale[t, k] act(gate_rows[rows[t, k]] . x[t]) (up_rows[rows[t, k]] . x[t]) down_rows[rows[t, k]]

Its function body (selected_rows_function) gathers each token's K rows (T, K, d) and multiplies them
with batched MatMuls; the compiled kernel reads them in place.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

DOMAIN = "momcompress"
OP_TYPE = "MoMExperts"
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "momcompress"
PLUGIN_VERSION = "1"
ATTRIBUTES = ("top_k", "activation", "plugin_namespace", "plugin_version", "max_blocks")
INPUT_NAMES = ("x", "top_w", "top_i", "routed_gate", "routed_up", "routed_down", "expert_block_scale", "accumulate")
BODIES = ("gather", "masked-dense", "moe")
DEFAULT_BODY = "gather"  # see the measurements in the module docstring


def register_schema() -> None:
    """Register the MoMExperts schema with onnx (once): torch.onnx's translation needs it to emit the node."""
    from onnx import defs

    if defs.has(OP_TYPE, DOMAIN):
        return
    Param = defs.OpSchema.FormalParameter
    opt = defs.OpSchema.FormalParameterOption.Optional
    inputs = [
        Param("x", "T", "(T, d) FFN input"),
        Param("top_w", "tensor(float)", "(T, k) renormalised router weights"),
        Param("top_i", "tensor(int64)", "(T, k) expert ids"),
        Param("routed_gate", "T", "(R, b, d) gate rows of the routed blocks"),
        Param("routed_up", "T", "(R, b, d) up rows of the routed blocks"),
        Param("routed_down", "T", "(R, b, d) down projection of the routed blocks, transposed"),
        Param("expert_block_scale", "tensor(float)", "(E, R) gate value of block r in expert e, 0 if unused"),
        Param("accumulate", "T", "(T, d) added to the output (the shared FFN's output)", param_option=opt),
    ]
    Attr, A = defs.OpSchema.Attribute, defs.OpSchema.AttrType
    schema = defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        DOMAIN_VERSION,
        "Routed experts of a frozen mixture-of-masks FFN (momcompress).",
        inputs=inputs,
        outputs=[Param("out", "T", "(T, d) accumulate + routed experts' output")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "model dtype")],
        attributes=[
            Attr("top_k", A.INT, "experts per token", required=False),
            Attr("activation", A.STRING, "silu, gelu_tanh or gelu", required=False),
            Attr("plugin_namespace", A.STRING, "TensorRT plugin namespace", required=False),
            Attr("plugin_version", A.STRING, "TensorRT plugin version", required=False),
            Attr("max_blocks", A.INT, "most routed blocks one token uses (set for the moe body only)", required=False),
        ],
    )
    defs.register_schema(schema)


SELECTED_ROWS_OP = "SelectedRowsFFN"
SELECTED_ROWS_INPUTS = ("x", "rows", "scale", "gate_rows", "up_rows", "down_rows", "accumulate")


def register_selected_rows_schema() -> None:
    """Register the SelectedRowsFFN schema with onnx (once), so the onnx checker and shape inference know it."""
    from onnx import defs

    if defs.has(SELECTED_ROWS_OP, DOMAIN):
        return
    Param = defs.OpSchema.FormalParameter
    opt = defs.OpSchema.FormalParameterOption.Optional
    Attr, A = defs.OpSchema.Attribute, defs.OpSchema.AttrType
    schema = defs.OpSchema(
        SELECTED_ROWS_OP,
        DOMAIN,
        DOMAIN_VERSION,
        "Per-token selected FFN rows (momcompress): out = accumulate + sum_k scale act(gate.x) (up.x) down over each token's rows.",
        inputs=[
            Param("x", "tensor(float)", "(T, d) FFN input"),
            Param("rows", "tensor(int64)", "(T, K) row ids per token; < 0 is padding (skipped)"),
            Param("scale", "tensor(float)", "(T, K) scale of each selected row"),
            Param("gate_rows", "W", "(R, d) gate rows"),
            Param("up_rows", "W", "(R, d) up rows"),
            Param("down_rows", "W", "(R, d) down projection, transposed: row r is W_down[:, r]"),
            Param("accumulate", "tensor(float)", "(T, d) added to the output", param_option=opt),
        ],
        outputs=[Param("out", "tensor(float)", "(T, d)")],
        type_constraints=[("W", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "weight dtype")],
        attributes=[Attr("activation", A.STRING, "silu, gelu_tanh or gelu", required=False)],
    )
    defs.register_schema(schema)


def selected_rows_function(activation: str, opset: int) -> onnx.FunctionProto:
    """The model-local function ("momcompress", "SelectedRowsFFN") in standard ops (Gather + batched MatMul).

    Needs the accumulate input on every node (attach_selected_rows_function gives nodes without one zeros)."""
    n = helper.make_node
    nodes = [
        _const("axis_last", [-1]),
        n("Constant", [], ["i_zero"], value_int=0),
        n("GreaterOrEqual", ["rows", "i_zero"], ["valid"]),  # (T, K) padding is < 0
        n("Max", ["rows", "i_zero"], ["safe_rows"]),  # padding reads row 0, weighted 0 below
        n("Constant", [], ["f_zero"], value_float=0.0),
        n("Where", ["valid", "scale", "f_zero"], ["s"]),  # (T, K)
        n("Gather", ["gate_rows", "safe_rows"], ["g_rows_w"], axis=0),  # (T, K, d): the selected rows, copied
        n("Gather", ["up_rows", "safe_rows"], ["u_rows_w"], axis=0),
        n("Gather", ["down_rows", "safe_rows"], ["d_rows_w"], axis=0),
        n("CastLike", ["g_rows_w", "x"], ["g_rows"]),
        n("CastLike", ["u_rows_w", "x"], ["u_rows"]),
        n("CastLike", ["d_rows_w", "x"], ["d_rows"]),
        n("Unsqueeze", ["x", "axis_last"], ["x3"]),  # (T, d, 1)
        n("MatMul", ["g_rows", "x3"], ["g3"]),  # (T, K, 1)
        n("MatMul", ["u_rows", "x3"], ["u3"]),
        n("Squeeze", ["g3", "axis_last"], ["hg"]),  # (T, K)
        n("Squeeze", ["u3", "axis_last"], ["hu"]),
        *_activation_nodes(activation, "hg", "ha", opset),
        n("Mul", ["ha", "hu"], ["h"]),
        n("Mul", ["h", "s"], ["hs"]),  # (T, K)
        _const("axis_1", [1]),
        n("Unsqueeze", ["hs", "axis_1"], ["hs3"]),  # (T, 1, K)
        n("MatMul", ["hs3", "d_rows"], ["o3"]),  # (T, 1, d)
        n("Squeeze", ["o3", "axis_1"], ["routed"]),  # (T, d)
        n("Add", ["routed", "accumulate"], ["out"]),
    ]
    return helper.make_function(
        DOMAIN, SELECTED_ROWS_OP, inputs=list(SELECTED_ROWS_INPUTS), outputs=["out"], nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=["activation"],
        doc_string=f"SelectedRowsFFN, gather body ({activation}); see momcompress/export/op.py",
    )


def selected_rows_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The SelectedRowsFFN nodes of the main graph, in graph order."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == SELECTED_ROWS_OP]


def attach_selected_rows_function(model: onnx.ModelProto, activation: str) -> None:
    """Add the SelectedRowsFFN function body to model (in place, replacing an earlier one); nodes without an
    accumulate input get zeros of x's shape (the body adds accumulate unconditionally)."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    for i, node in enumerate(list(selected_rows_nodes(model))):
        if len(node.input) < 7 or not node.input[6]:
            prefix = f"{node.name or 'selected_rows'}_{i}_acc"
            shape = helper.make_node("Shape", [node.input[0]], [prefix + "_shape"])
            zeros = helper.make_node("ConstantOfShape", [prefix + "_shape"], [prefix],
                                     value=helper.make_tensor(prefix + "_zero", TensorProto.FLOAT, [1], [0.0]))
            at = list(model.graph.node).index(node)
            model.graph.node.insert(at, zeros)
            model.graph.node.insert(at, shape)
            del node.input[6:]
            node.input.append(prefix)
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name == SELECTED_ROWS_OP)]
    del model.functions[:]
    model.functions.extend(keep)
    model.functions.append(selected_rows_function(activation, opset))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))


def translation_table() -> dict:
    """torch.onnx custom_translation_table entry: torch.ops.momcompress.routed_experts -> one MoMExperts node."""
    import onnxscript
    import torch

    import momcompress.kernels  # noqa: F401  registers torch.ops.momcompress.routed_experts

    register_schema()
    opset = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

    def routed_experts(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation: str):
        return opset.MoMExperts(
            x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale,
            top_k=int(top_i.shape[-1]), activation=activation, plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
        )

    return {torch.ops.momcompress.routed_experts.default: routed_experts}


# -- graph passes ---------------------------------------------------------------------------------------
def mom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MoMExperts nodes of the main graph, in graph order."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def fuse_accumulate(model: onnx.ModelProto) -> int:
    """Fold `Add(shared, MoMExperts(...))` into MoMExperts' accumulate input (in place); returns the count."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    fused = 0
    for node in mom_nodes(model):
        out = node.output[0]
        users = consumers.get(out, [])
        if len(node.input) > 7 or len(users) != 1 or out in graph_outputs:
            continue
        add = users[0]
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
            continue
        other = add.input[1] if add.input[0] == out else add.input[0]
        node.input.append(other)
        node.output[0] = add.output[0]
        model.graph.node.remove(add)
        fused += 1
    return fused


def _const(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))


def _activation_nodes(activation: str, g: str, out: str, opset: int) -> list[onnx.NodeProto]:
    """act(g) -> out, as standard ONNX ops."""
    if activation == "silu":
        return [helper.make_node("Sigmoid", [g], ["act_sig"]), helper.make_node("Mul", [g, "act_sig"], [out])]
    if activation in ("gelu_tanh", "gelu") and opset >= 20:
        return [helper.make_node("Gelu", [g], [out], approximate="tanh" if activation == "gelu_tanh" else "none")]
    if activation == "gelu":  # 0.5 g (1 + erf(g / sqrt 2))
        return [
            helper.make_node("Constant", [], ["act_c"], value_float=0.7071067811865476),
            helper.make_node("CastLike", ["act_c", g], ["act_cl"]),
            helper.make_node("Mul", [g, "act_cl"], ["act_s"]),
            helper.make_node("Erf", ["act_s"], ["act_e"]),
            helper.make_node("Constant", [], ["act_one"], value_float=1.0),
            helper.make_node("CastLike", ["act_one", g], ["act_onel"]),
            helper.make_node("Add", ["act_e", "act_onel"], ["act_p"]),
            helper.make_node("Mul", [g, "act_p"], ["act_gp"]),
            helper.make_node("Constant", [], ["act_half"], value_float=0.5),
            helper.make_node("CastLike", ["act_half", g], ["act_halfl"]),
            helper.make_node("Mul", ["act_gp", "act_halfl"], [out]),
        ]
    if activation == "gelu_tanh":  # 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
        nodes = []
        for name, value in (("act_a", 0.044715), ("act_k", 0.7978845608028654), ("act_one", 1.0), ("act_half", 0.5)):
            nodes += [helper.make_node("Constant", [], [name + "_f"], value_float=value), helper.make_node("CastLike", [name + "_f", g], [name])]
        return nodes + [
            helper.make_node("Mul", [g, g], ["act_g2"]),
            helper.make_node("Mul", ["act_g2", g], ["act_g3"]),
            helper.make_node("Mul", ["act_g3", "act_a"], ["act_ag3"]),
            helper.make_node("Add", [g, "act_ag3"], ["act_in"]),
            helper.make_node("Mul", ["act_in", "act_k"], ["act_u"]),
            helper.make_node("Tanh", ["act_u"], ["act_t"]),
            helper.make_node("Add", ["act_t", "act_one"], ["act_p"]),
            helper.make_node("Mul", [g, "act_p"], ["act_gp"]),
            helper.make_node("Mul", ["act_gp", "act_half"], [out]),
        ]
    raise ValueError(f"activation must be silu, gelu_tanh or gelu, got {activation!r}")


def _mom_function(nodes: list[onnx.NodeProto], opsets: list, what: str) -> onnx.FunctionProto:
    """The model-local MoMExperts function over nodes (inputs INPUT_NAMES, output "out")."""
    return helper.make_function(
        DOMAIN, OP_TYPE, inputs=list(INPUT_NAMES), outputs=["out"], nodes=nodes, opset_imports=opsets,
        attributes=list(ATTRIBUTES), doc_string=f"MoMExperts, {what}; see momcompress/export/op.py",
    )


def _block_weight_nodes() -> list[onnx.NodeProto]:
    """Nodes computing w (T, R) fp32, w[t, r] = sum_j top_w[t, j] * scale[top_i[t, j], r], and the shape
    pieces the bodies share: axis_last, axis_1, minus_one, zero, d_dim ([d]), b_dim ([b]), rows_shape ([-1, d])."""
    n = helper.make_node
    return [
        n("Gather", ["expert_block_scale", "top_i"], ["z"], axis=0),  # (T, k, R)
        _const("axis_last", [-1]),
        n("Unsqueeze", ["top_w", "axis_last"], ["top_w3"]),  # (T, k, 1)
        n("Mul", ["z", "top_w3"], ["wz"]),
        _const("axis_1", [1]),
        n("ReduceSum", ["wz", "axis_1"], ["w"], keepdims=0),  # (T, R) fp32
        _const("minus_one", [-1]),
        n("Shape", ["routed_gate"], ["d_dim"], start=2),  # (1,) = [d]
        n("Concat", ["minus_one", "d_dim"], ["rows_shape"], axis=0),  # [-1, d]
        n("Shape", ["routed_gate"], ["b_dim"], start=1, end=2),  # [b]
        _const("zero", [0]),
    ]


def function_body(body: str, activation: str, opset: int) -> onnx.FunctionProto:
    """The model-local function ("momcompress", "MoMExperts") computing the node with standard ops.

    Args:
        body: "gather" (reads only the blocks selected in this call), "masked-dense" (all routed blocks) or
            "moe" (com.microsoft::MoE, one expert per block; its nodes need max_blocks: use attach_function).
        activation: the model's FFN activation (the function is local to one model, so it is fixed).
        opset: the model's default-domain opset.
    """
    if body not in BODIES:
        raise ValueError(f"body must be one of {BODIES}, got {body!r}")
    if body == "moe":
        return _moe_function(activation, opset)
    n = helper.make_node
    nodes = _block_weight_nodes()
    if body == "gather":
        nodes += [
            # union over the call's tokens of the blocks with w != 0: (U,) block ids
            n("Abs", ["w"], ["w_abs"]),
            _const("axis_0", [0]),
            n("ReduceMax", ["w_abs", "axis_0"], ["w_any"], keepdims=0),  # (R,)
            n("Constant", [], ["f_zero"], value_float=0.0),
            n("Greater", ["w_any", "f_zero"], ["used"]),
            n("NonZero", ["used"], ["used_idx2"]),  # (1, U)
            n("Squeeze", ["used_idx2", "axis_0"], ["used_idx"]),  # (U,)
            n("Gather", ["routed_gate", "used_idx"], ["g_sel"], axis=0),  # (U, b, d): the only weights read
            n("Gather", ["routed_up", "used_idx"], ["u_sel"], axis=0),
            n("Gather", ["routed_down", "used_idx"], ["d_sel"], axis=0),
            n("Gather", ["w", "used_idx"], ["w_sel"], axis=1),  # (T, U)
        ]
        g, u, dn, w = "g_sel", "u_sel", "d_sel", "w_sel"
    else:
        g, u, dn, w = "routed_gate", "routed_up", "routed_down", "w"
    nodes += [
        n("Reshape", [g, "rows_shape"], ["wg"]),  # (U*b, d)
        n("Reshape", [u, "rows_shape"], ["wu"]),
        n("Reshape", [dn, "rows_shape"], ["wd"]),
        n("Gemm", ["x", "wg"], ["hg"], transB=1),  # (T, U*b)
        n("Gemm", ["x", "wu"], ["hu"], transB=1),
        *_activation_nodes(activation, "hg", "ha", opset),
        n("Mul", ["ha", "hu"], ["h"]),
        # scale each block's b neurons by w[t, block]
        n("Concat", ["zero", "minus_one", "b_dim"], ["h3_shape"], axis=0),  # [T, U, b]
        n("Reshape", ["h", "h3_shape"], ["h3"]),
        n("CastLike", [w, "x"], ["w_x"]),
        n("Unsqueeze", ["w_x", "axis_last"], ["w3"]),  # (T, U, 1)
        n("Mul", ["h3", "w3"], ["hs3"]),
        n("Concat", ["zero", "minus_one"], ["h2_shape"], axis=0),
        n("Reshape", ["hs3", "h2_shape"], ["hs"]),  # (T, U*b)
        n("MatMul", ["hs", "wd"], ["routed"]),  # (T, d)
        n("Add", ["routed", "accumulate"], ["out"]),
    ]
    return _mom_function(nodes, [helper.make_opsetid("", opset)], f"{body} body ({activation})")


def _moe_function(activation: str, opset: int) -> onnx.FunctionProto:
    """The body on onnxruntime's contrib op com.microsoft::MoE, one MoE expert per routed block.

    MoE's experts here are the R routed blocks themselves (intermediate width b), so its weights are
    the node's routed blocks reshaped, not copied: fc1 (R, 2b, d) gate/up interleaved by neuron
    (onnxruntime's CPU kernel takes only that SwiGLU layout; alpha 1, beta 0 make it silu(g) * u) and
    fc2 (R, d, b). Both come from initializers, so onnxruntime constant-folds them once at session
    start. A token's block weights w[t, r] (top_w times the block's gate value) go in as logits log(w)
    (-1e4 where w = 0); MoE's softmax, top-k over the node's `max_blocks` (the most blocks one token can
    use, set per node at export) and renormalisation give w / sum(w), and the output is scaled back by
    sum(w). MoE then runs only the blocks a token uses, each block's weights read in place.
    SiLU-gated FFNs only (MoE has no exact GELU-gated activation); not for TensorRT's parser.
    """
    if activation != "silu":
        raise ValueError(f"the moe body needs a SiLU-gated FFN (com.microsoft::MoE has no exact {activation}); use gather or masked-dense")
    n = helper.make_node
    nodes = _block_weight_nodes() + [
        # -- expert layout (constant-folded): fc1 (R, 2b, d) rows g0, u0, g1, u1, ...; fc2 (R, d, b)
        _const("axis_2", [2]),
        n("Unsqueeze", ["routed_gate", "axis_2"], ["g4"]),  # (R, b, 1, d)
        n("Unsqueeze", ["routed_up", "axis_2"], ["u4"]),
        n("Concat", ["g4", "u4"], ["gu"], axis=2),  # (R, b, 2, d)
        n("Concat", ["zero", "minus_one", "d_dim"], ["w3_shape"], axis=0),  # [R, 2b, d]
        n("Reshape", ["gu", "w3_shape"], ["fc1"]),
        n("Transpose", ["routed_down"], ["fc2"], perm=[0, 2, 1]),  # (R, d, b)
        # -- routing: logits whose renormalised softmax over the used blocks is w / sum(w)
        n("Constant", [], ["f_zero"], value_float=0.0),
        n("Greater", ["w", "f_zero"], ["on"]),  # (T, R)
        n("Log", ["w"], ["log_w"]),
        n("Constant", [], ["f_off"], value_float=-1e4),
        n("Where", ["on", "log_w", "f_off"], ["logits"]),
        n("CastLike", ["logits", "x"], ["logits_x"]),
        n("MoE", ["x", "logits_x", "fc1", "", "fc2"], ["routed_n"], domain="com.microsoft",
          activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=1),
        n("ReduceSum", ["w", "axis_last"], ["w_sum"], keepdims=1),  # (T, 1)
        n("CastLike", ["w_sum", "x"], ["w_sum_x"]),
        n("Mul", ["routed_n", "w_sum_x"], ["routed"]),
        n("Add", ["routed", "accumulate"], ["out"]),
    ]
    # MoE's k is an attribute: the node's max_blocks, referenced.
    next(node for node in nodes if node.op_type == "MoE").attribute.append(onnx.AttributeProto(name="k", ref_attr_name="max_blocks", type=onnx.AttributeProto.INT))
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return _mom_function(nodes, opsets, "moe body (com.microsoft::MoE, one expert per block, silu)")


def max_blocks(expert_block_scale, top_k: int) -> int:
    """The most routed blocks one token can use: the union of its top_k experts' blocks, at most
    (the sum of the top_k widest experts, capped at R). expert_block_scale: (E, R) array."""
    import numpy as np

    uses = np.asarray(expert_block_scale) != 0
    sizes = np.sort(uses.sum(axis=1))[::-1]
    return max(1, min(int(sizes[:top_k].sum()), uses.shape[1]))


def _node_max_blocks(node: onnx.NodeProto, initializers: dict) -> int:
    from onnx import numpy_helper

    name = node.input[INPUT_NAMES.index("expert_block_scale")]
    if name not in initializers:
        raise ValueError(f"MoMExperts input {name!r} is not an initializer of the graph; the moe body needs the block scales as constants")
    top_k = next(a.i for a in node.attribute if a.name == "top_k")
    return max_blocks(numpy_helper.to_array(initializers[name]), top_k)


def attach_function(model: onnx.ModelProto, body: str, activation: str) -> None:
    """Give every MoMExperts node the accumulate input and add the function body to the model (in place).

    For the moe body each node also gets its max_blocks attribute, from its block scales (an initializer)."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    initializers = {init.name: init for init in model.graph.initializer} if body == "moe" else {}
    for node in mom_nodes(model):
        if len(node.input) < 8:  # no shared part to add: accumulate into zeros
            raise ValueError("MoMExperts node without accumulate input; run fuse_accumulate first")
        _drop_attribute(node, "max_blocks")
        if body == "moe":
            node.attribute.append(helper.make_attribute("max_blocks", _node_max_blocks(node, initializers)))
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]  # e.g. SelectedRowsFFN's
    del model.functions[:]
    model.functions.extend(keep)
    model.functions.append(function_body(body, activation, opset))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    if body == "moe" and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _drop_attribute(node: onnx.NodeProto, name: str) -> None:
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep)


def strip_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without the MoMExperts function bodies: TensorRT's parser then maps each node to the plugin
    registered under (op type, plugin_namespace, plugin_version). Load model with load_external_data=False
    for large models: external weights stay references."""
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    keep = [f for f in stripped.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
    del stripped.functions[:]
    stripped.functions.extend(keep)
    for node in mom_nodes(stripped):  # the plugin's fields are top_k and activation
        _drop_attribute(node, "max_blocks")
    return stripped
