"""Self-checks of an exported model against PyTorch, as a checklist (optimum's `✓ all values close`).

`run_checks` runs, on real prompts (a left-padded batch of two):
1. the onnx checker (and, for MoM models, one MoMExperts or SelectFFN node per layer with its function body);
2. onnxruntime vs PyTorch logits without past key/values (prefill), within atol at unpadded positions;
3. logits and present key/values with past key/values (a 3-token continuation after the prefill);
4. greedy generation of new_tokens tokens through onnxruntime with the KV cache, identical to
   transformers' `generate` in PyTorch.
MoMExperts runs with the compiled momcompress kernel when `momcompress build-ops` has built it (the
logits checks say which path ran); the function body every file carries is then checked too (prefill
logits in a session without the kernel), so both paths of the file are verified.
A per-token selector model (SelectFFN nodes, hard thresholds) runs checks 2-4 with its thresholds
switched off on both sides, and then 5. each SelectFFN node alone, with the file's thresholds, on its
layer's real inputs, where only a threshold tie may make a token differ (see `run_checks`).
Every check runs; if any fails, ExportCheckError carries the whole checklist and names the failures.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from momcompress.errors import ExportCheckError
from momcompress.export import op
from momcompress.export.causal_lm import FlatCacheLM, OrtCausalLM, greedy_generate, prefill_positions

PROMPTS = (
    "The river ran cold under the old stone bridge, and the town",
    "She opened the door and looked out at the rain",
)
CONTINUATION = 3  # tokens fed with past key/values in check 3


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return f"{'✓' if self.ok else '✗'} {self.name} ({self.detail})"


def prompt_batch(tokenizer, prompts=PROMPTS) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) (B, S) int64 of prompts, left-padded as for generation."""
    tok = copy.copy(tokenizer)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(list(prompts), return_tensors="np", padding=True)
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def _close(name: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float, where: np.ndarray | None = None) -> Check:
    """|got - want| <= atol + rtol * max|want| everywhere (at `where`): fp32 rounding grows with depth and
    with the logits' scale (30 layers of SmolLM2 with logits ~30 give ~1.5e-4 for any reordering of sums)."""
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    scale = np.abs(want.astype(np.float64))
    if where is not None:
        diff, scale = diff[where], scale[where]
    worst = float(diff.max()) if diff.size else 0.0
    bound = atol + rtol * (float(scale.max()) if scale.size else 0.0)
    ok = bool(np.isfinite(worst) and worst <= bound)
    return Check(name, ok, f"atol {atol:g} + rtol {rtol:g} x max|ref| = {bound:.1e}, max diff {worst:.2e}")


def check_graph(path: Path, num_layers: int, is_mom: bool) -> Check:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - the checker's message is the detail
        return Check("onnx checker", False, str(exc).splitlines()[0][:300])
    model = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if not is_mom:
        return Check("onnx checker", True, f"opset {opset}, dense")
    from momcompress.export import select_op

    selects = select_op.select_nodes(model)
    if selects:
        bodies = [f for f in model.functions if f.domain == op.DOMAIN and f.name in (select_op.OP_TYPE, select_op.HIDDEN_OP)]
        routed = sum(n.op_type == "If" for n in model.graph.node)
        ok = len(selects) == num_layers and len(bodies) == 2 and routed in (0, num_layers)
        return Check("onnx checker", ok, f"opset {opset}, {len(selects)} {select_op.OP_TYPE} nodes for {num_layers} layers, "
                     f"{routed} routed by token count, {len(bodies)} function bodies")
    nodes = op.mom_nodes(model)
    bodies = [f for f in model.functions if f.domain == op.DOMAIN and f.name == op.OP_TYPE]
    ok = len(nodes) == num_layers and len(bodies) == 1 and all(len(n.input) == 8 for n in nodes)
    return Check("onnx checker", ok, f"opset {opset}, {len(nodes)} {op.OP_TYPE} nodes for {num_layers} layers, {len(bodies)} function body")


def run_checks(
    path: Path, model, tokenizer, atol: float = 1e-4, rtol: float = 1e-5, new_tokens: int = 32, provider: str = "CPUExecutionProvider",
    experts: str = "auto", info: dict | None = None,
) -> list[Check]:
    """Run every check of the exported file at path against model; raise ExportCheckError if one fails.

    Values pass when |onnxruntime - PyTorch| <= atol + rtol * max|PyTorch value|. experts: how MoMExperts
    runs (OrtCausalLM's experts). info, if given, receives "experts_path" (kernel / function body / None)
    and "ops_library".

    A per-token selector model (SelectFFN nodes) is checked in two parts. Its masks are hard thresholds:
    a score that lies on one flips with the summation order, and the flip then travels through every
    later layer and position (on the default model, one such flip put the with-past logits 3.6 apart).
    So the whole-model checks (logits, keys/values, greedy tokens) run with every threshold switched off
    on both sides (the file's threshold initializers replaced in the session, not in the file): they
    check the graph, its weights and its cache exactly. Then `check_select_nodes` runs each layer's node,
    with the file's own thresholds, on that layer's real inputs and allows a difference only at a token
    where a neuron's score lies on its threshold."""
    from momcompress.runtime.select_ffn import select_layers

    selectors = select_layers(model)
    if not selectors:
        checks = _run_checks(path, model, tokenizer, atol, rtol, new_tokens, provider, experts, info)
    else:
        saved = [(m.path, m.x_threshold.clone(), m.h_threshold.clone()) for m in selectors]
        try:
            for m in selectors:  # the masked formula, as the ONNX body computes it
                m.path = "masked"
                m.x_threshold.fill_(THRESHOLD_OFF)
                m.h_threshold.fill_(THRESHOLD_OFF)
            off = threshold_overrides(path)
            checks = _run_checks(path, model, tokenizer, atol, rtol, new_tokens, provider, experts, info,
                                 initializers=off, note="selector thresholds off", op_name="SelectFFN")
            for m, (_, x_t, h_t) in zip(selectors, saved):
                m.x_threshold.copy_(x_t)
                m.h_threshold.copy_(h_t)
            checks.append(check_select_nodes(path, model, tokenizer, selectors, experts if provider == "CPUExecutionProvider" else "body"))
        finally:
            for m, (before, x_t, h_t) in zip(selectors, saved):
                m.path = before
                m.x_threshold.copy_(x_t)
                m.h_threshold.copy_(h_t)
    if not all(c.ok for c in checks):
        raise ExportCheckError(_failure(checks))
    return checks


THRESHOLD_OFF = -1.0  # |v| > -1 holds for every value: the selector keeps every channel and neuron
SELECT_TIE = 1e-5  # a neuron whose |h| lies within this of its threshold, relative to the token's largest |h|, is a tie
SELECT_LAYER_RTOL = 1e-4  # a layer's output per token, relative to the layer's largest output (as freeze checks it)


def threshold_overrides(path: Path) -> dict[str, np.ndarray]:
    """{initializer name: THRESHOLD_OFF array} for the x_threshold and h_threshold inputs of every SelectFFN node."""
    import onnx

    from momcompress.export import select_op

    model = onnx.load(str(path), load_external_data=False)
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    out = {}
    for node in select_op.select_nodes(model):
        for name in (node.input[1], node.input[4]):
            if name not in shapes:
                raise ExportCheckError(f"SelectFFN node {node.name}: its threshold {name!r} is not an initializer of {path}; "
                                       "re-export with `momcompress export`")
            out[name] = np.full(shapes[name], THRESHOLD_OFF, dtype=np.float32)
    return out


def check_select_nodes(path: Path, model, tokenizer, selectors, experts: str = "auto") -> Check:
    """Each SelectFFN node of the file, alone in onnxruntime with the file's own weights and thresholds, on
    the real inputs its layer gets in PyTorch (the check prompts), against the layer's masked formula. The
    node runs the compiled momcompress kernel when it is registered (experts as in OrtCausalLM: "auto",
    "kernel" or "body"), else its function body. Where the file routes each layer by token count (an If:
    SelectFFN for few tokens, MatMul + SelectHidden + MatMul for many), the layer is rebuilt the same way
    and its inputs run all at once and one token at a time, so both branches are checked.

    Both sides read the same inputs, so the input channels kept are the same; a neuron's keep decision can
    still differ where |h| lies on its threshold (the two sums of gate and up differ in the last bits). A
    token passes when its output is within SELECT_LAYER_RTOL of the layer's largest output, or when one of
    its neurons lies within SELECT_TIE of its threshold; at most SELECT_FLIP_FRACTION of the tokens may be
    such ties."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from momcompress.export import ort_ops, select_op
    from momcompress.freeze.freezer import SELECT_FLIP_FRACTION
    from momcompress.runtime.select_ffn import ACTIVATIONS

    options = ort.SessionOptions()
    options.log_severity_level = 3
    library = None if experts == "body" else ort_ops.register(options, required=experts == "kernel")
    name = f"SelectFFN nodes alone, file's thresholds, on real layer inputs ({ort_ops.KERNEL if library else ort_ops.FUNCTION_BODY})"
    ids, mask = prompt_batch(tokenizer)
    inputs = []
    handles = [m.register_forward_hook(lambda _m, args, _o: inputs.append(args[0].detach().reshape(-1, args[0].shape[-1])))
               for m in selectors]
    try:
        FlatCacheLM(model).eval().run(ids, mask, prefill_positions(mask), FlatCacheLM(model).first_past(ids.shape[0]))
    finally:
        for h in handles:
            h.remove()
    real = torch.from_numpy(mask.reshape(-1).astype(bool))
    file = onnx.load(str(path))
    nodes = select_op.select_nodes(file)
    if len(nodes) != len(selectors) or len(inputs) != len(selectors):
        return Check(name, False, f"{len(nodes)} SelectFFN nodes, {len(selectors)} selector layers, {len(inputs)} layer inputs captured")
    inits = {i.name: i for i in file.graph.initializer}
    body = [f for f in file.functions if f.domain == op.DOMAIN and f.name in (select_op.OP_TYPE, select_op.HIDDEN_OP)]
    routed = select_op.ROW_TOKENS_NAME in inits  # the file routes calls by token count: check both branches
    tokens = differ = ties = 0
    worst_tie = 0.0
    for i, (node, layer, x) in enumerate(zip(nodes, selectors, inputs)):
        x = x[real] if x.shape[0] == real.shape[0] else x
        dtype = x.dtype  # the model's; the tables may be 16-bit in an fp32 model
        if dtype not in (torch.float32, torch.float16):
            return Check(name, False, f"layer {i}: activations in {dtype}; this check runs float32 and float16 models")
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(str(dtype).removeprefix("torch.")))
        d = x.shape[-1]
        one = helper.make_node(select_op.OP_TYPE, ["x", *node.input[1:]], ["out"], domain=op.DOMAIN)
        one.attribute.extend(node.attribute)
        graph = helper.make_graph([one], f"layer{i}", [helper.make_tensor_value_info("x", elem, [None, d])],
                                  [helper.make_tensor_value_info("out", elem, [None, d])],
                                  initializer=[inits[n] for n in node.input[1:]])
        single = helper.make_model(graph, opset_imports=list(file.opset_import), functions=body, ir_version=file.ir_version)
        if routed:  # as in the file: an If on the token count, with the file's switch
            select_op.route_by_tokens(single, int(onnx.numpy_helper.to_array(inits[select_op.ROW_TOKENS_NAME])))
        session = ort.InferenceSession(single.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs = [session.run(None, {"x": x.numpy()})[0]]  # all tokens at once (routed: the MatMul branch)
        if routed or library is not None:  # one token per call (routed: the SelectFFN branch; the kernel's row path)
            outputs.append(np.concatenate([session.run(None, {"x": x[t:t + 1].numpy()})[0] for t in range(x.shape[0])]))
        with torch.no_grad():
            ref = layer.masked(x).float()
            keep_x = x.abs().float() > layer.x_threshold
            gu = ((x * keep_x.to(x.dtype)) @ layer.tables_for(x)[0]).float().view(x.shape[0], -1, 2)
            h = ACTIVATIONS[layer.activation](gu[..., 0]) * gu[..., 1]
        err = torch.stack([(torch.from_numpy(got).float() - ref).abs().amax(-1) for got in outputs]).amax(0)
        bad = err > SELECT_LAYER_RTOL * ref.abs().max().clamp_min(1e-12)
        margin = (h.abs() - layer.h_threshold).abs().amin(-1) / h.abs().amax(-1).clamp_min(1e-12)
        tie = margin <= SELECT_TIE
        tokens += x.shape[0]
        differ += int(bad.sum())
        ties += int((bad & tie).sum())
        if bool((bad & ~tie).any()):
            j = int(torch.nonzero(bad & ~tie)[0])
            return Check(name, False, f"layer {i}, token {j}: output {float(err[j]):.2e} from PyTorch's with no threshold tie "
                         f"(nearest neuron {float(margin[j]):.1e} of the largest |h| from its threshold)")
        if bool(bad.any()):
            worst_tie = max(worst_tie, float(margin[bad].max()))
    ok = differ <= SELECT_FLIP_FRACTION * tokens
    ties_text = f"{ties} at a threshold tie (a neuron within {worst_tie:.1e} of the largest |h| from its threshold)" if ties else "no ties"
    return Check(name, ok, f"{len(nodes)} layers x {tokens // max(len(nodes), 1)} tokens: {tokens - differ} within "
                 f"{SELECT_LAYER_RTOL:g} of the layer's largest output, {ties_text}; at most {SELECT_FLIP_FRACTION:.0%} allowed")


def _run_checks(path: Path, model, tokenizer, atol: float, rtol: float, new_tokens: int, provider: str, experts: str,
                info: dict | None, initializers: dict | None = None, note: str = "", op_name: str = "MoMExperts") -> list[Check]:
    from momcompress.export import ort_ops

    is_mom = hasattr(model.config, "momcompress")
    checks = [check_graph(path, model.config.num_hidden_layers, is_mom)]
    if not checks[0].ok:
        raise ExportCheckError(_failure(checks))
    ort_lm = OrtCausalLM(path, provider, experts=experts, initializers=initializers)
    if info is not None:
        info["experts_path"] = ort_lm.experts_path
        info["ops_library"] = str(ort_lm.ops_library) if ort_lm.ops_library else None
    torch_lm = FlatCacheLM(model).eval()
    ids, mask = prompt_batch(tokenizer)
    pos = prefill_positions(mask)
    B = ids.shape[0]
    ran = f", {op_name}: {ort_lm.experts_path}" if ort_lm.experts_path else ""
    ran += f", {note}" if note else ""

    # 2. prefill, no past: compare at real (unpadded) positions
    got, got_present = ort_lm.run(ids, mask, pos, ort_lm.first_past(B))
    want, want_present = torch_lm.run(ids, mask, pos, torch_lm.first_past(B))
    checks.append(_close(f"logits close without past (batch 2, left padding{ran})", got, want, atol, rtol, mask.astype(bool)))
    if ort_lm.experts_path == ort_ops.KERNEL:  # the file's function body, for onnxruntime without the kernel
        body_lm = OrtCausalLM(path, provider, experts="body", initializers=initializers)
        body, _ = body_lm.run(ids, mask, pos, body_lm.first_past(B))
        checks.append(_close("function body logits close without past (onnxruntime without the kernel)", body, want, atol, rtol, mask.astype(bool)))

    # 3. continuation with past key/values, each runtime on its own cache
    nxt = (3 + np.arange(B * CONTINUATION).reshape(B, CONTINUATION) % max(model.config.vocab_size - 3, 1)).astype(np.int64)
    mask2 = np.concatenate([mask, np.ones_like(nxt)], axis=1)
    pos2 = pos[:, -1:] + 1 + np.arange(CONTINUATION)[None]
    got2, got_present2 = ort_lm.run(nxt, mask2, pos2, got_present)
    want2, want_present2 = torch_lm.run(nxt, mask2, pos2, want_present)
    checks.append(_close(f"logits close with past key/values ({ids.shape[1]} cached, {CONTINUATION} new{ran})", got2, want2, atol, rtol))
    # keys/values at padded positions are never attended to: compare real positions only
    real = mask2.astype(bool)[:, None, :, None]
    where = np.broadcast_to(real, got_present2[0].shape)
    flat = [(g[where], w[where]) for g, w in zip(got_present2, want_present2)]
    checks.append(_close(f"present key/values close{' (' + note + ')' if note else ''}",
                         np.concatenate([g for g, _ in flat]), np.concatenate([w for _, w in flat]), atol, rtol))

    # 4. greedy generation with the KV cache: onnxruntime vs transformers' generate
    ort_tokens = greedy_generate(ort_lm, ids, mask, new_tokens)
    torch_tokens = torch_generate(model, ids, mask, new_tokens)
    same = ort_tokens.shape == torch_tokens.shape and bool((ort_tokens == torch_tokens).all())
    if same:
        detail = f"{new_tokens} tokens x {B} prompts identical"
    else:
        first = int(np.argmax((ort_tokens != torch_tokens).any(axis=0))) - ids.shape[1]
        detail = f"first difference at new token {first} of {new_tokens}"
    checks.append(Check(f"greedy generation identical to PyTorch (KV cache{', ' + note if note else ''})", same, detail))
    return checks


@torch.no_grad()
def torch_generate(model, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """transformers' greedy `generate` for exactly new_tokens tokens (no stop at end-of-sequence)."""
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    config.do_sample, config.num_beams = False, 1
    config.max_new_tokens, config.min_new_tokens, config.max_length = new_tokens, None, None
    for name in ("temperature", "top_p", "top_k"):
        setattr(config, name, None)
    out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), generation_config=config)
    return out.numpy()


def _failure(checks: list[Check]) -> str:
    failed = ", ".join(c.name for c in checks if not c.ok)
    lines = "\n".join(c.line() for c in checks)
    return f"the exported model failed {failed}; nothing was written\n{lines}"
