"""Standalone modeling code of a frozen MoM folder, for plain transformers (no momcompress needed).

`momcompress freeze` copies this file verbatim into the frozen folder as `modeling_momcompress.py` and
points config.json's `auto_map` at it, so that on any machine with torch and transformers

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(FROZEN_DIR, trust_remote_code=True)

builds the source architecture (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text: the class
transformers maps the config's model_type to) with every FFN replaced by `MoMFFN` below, the torch
reference of the frozen mixture-of-masks FFN (DESIGN.md, "Freeze"). `momcompress.load` stays the fast
path (kernels, decode/grouped paths); this file is the portable one and computes the same function.

This file must not import momcompress: it runs where momcompress is not installed.

Layer i's tensors in model.safetensors (`model.layers.{i}.mlp.*`), hidden size d, block size b:
    router_weight (E, d) fp32; shared_gate, shared_up (S*b, d); shared_down (d, S*b); shared_scale (E, S)
    routed_gate, routed_up, routed_down (R, b, d) (down transposed)
    expert_offsets (E+1,), expert_blocks (nnz,), expert_scales (nnz,): expert e's routed blocks and gates
config.json's `momcompress` section holds E, k, b, the activation, the routing rule and per layer the
counts (shared, routed_stored, entries) that fix these shapes.

A folder frozen from the per-token selector (section "selector": "activations") holds instead, per layer
with F' stored neurons: gate_up (d, 2F') (gate and up transposed, interleaved per neuron), down (F', d),
x_threshold (d,) and h_threshold (F',) fp32; `SelectFFN` below computes it (section "layers" gives F').
Frozen with `--table-dtype bfloat16` (or float16), gate_up and down are stored 16-bit; loading into the fp32
model widens them, so this file computes the rounded weights' function in fp32, as momcompress's kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu": F.gelu,
}
# The section's format versions this file reads (lists as tensors, counts in config.json).
READS_FORMATS = (2,)


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, routing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, d) -> top-k expert weights (T, k) fp32 and ids (T, k): softmax over a linear fp32 router;
    "renormalized" rescales the k weights to sum to 1, "unit" gives every selected expert weight 1."""
    probs = torch.softmax(F.linear(x.float(), router_weight.float()), dim=-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    if routing == "unit":
        return torch.ones_like(top_p), top_i
    return top_p / top_p.sum(dim=-1, keepdim=True), top_i


def expert_block_scale(offsets: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, num_routed: int) -> torch.Tensor:
    """(E, R) gate value of routed block r in expert e (0 where e does not list it), from the flat lists."""
    E = offsets.numel() - 1
    table = torch.zeros(E, num_routed, dtype=torch.float32, device=blocks.device)
    owner = torch.repeat_interleave(torch.arange(E, device=blocks.device), offsets.diff())
    if owner.numel():
        table.index_put_((owner, blocks), scales.float(), accumulate=True)
    return table


def routed_forward(x, top_w, top_i, routed_gate, routed_up, routed_down, block_scale, activation: str) -> torch.Tensor:
    """Routed part (T, d): each token weighs routed block r by w[t, r] = sum_j top_w[t, j] * scale[top_i[t, j], r];
    the union of the blocks any token uses is gathered once and computed for all tokens."""
    T, d = x.shape
    b = routed_gate.shape[1]
    w = (top_w.float().unsqueeze(-1) * block_scale[top_i]).sum(dim=1)  # (T, R)
    used = w.ne(0).any(dim=0).nonzero().squeeze(-1)  # (U,)
    if used.numel() == 0:
        return torch.zeros_like(x)
    wg = routed_gate.index_select(0, used).reshape(-1, d)  # (U*b, d)
    wu = routed_up.index_select(0, used).reshape(-1, d)
    wd = routed_down.index_select(0, used).reshape(-1, d)
    h = ACTIVATIONS[activation](x @ wg.T) * (x @ wu.T)  # (T, U*b)
    h = (h.view(T, -1, b) * w[:, used].unsqueeze(-1).to(h.dtype)).view(T, -1)
    return h @ wd


class MoMFFN(nn.Module):
    """A frozen mixture-of-masks FFN: shared dense neurons + routed blocks of the top-k experts."""

    def __init__(self, hidden_size: int, section: dict, counts: dict):
        super().__init__()
        d, b, E = hidden_size, section["block_size"], section["num_experts"]
        S, R, nnz = counts["shared"], counts["routed_stored"], counts["entries"]
        self.hidden_size, self.block_size, self.top_k = d, b, section["top_k"]
        self.activation, self.routing = section["activation"], section.get("routing", "renormalized")

        def weight(*shape, dtype=None):
            return nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)

        self.router_weight = weight(E, d, dtype=torch.float32)
        self.shared_gate, self.shared_up, self.shared_down = weight(S * b, d), weight(S * b, d), weight(d, S * b)
        self.routed_gate, self.routed_up, self.routed_down = weight(R, b, d), weight(R, b, d), weight(R, b, d)
        self.register_buffer("shared_scale", torch.ones(E, S, dtype=torch.float32))
        self.register_buffer("expert_offsets", torch.zeros(E + 1, dtype=torch.int64))
        self.register_buffer("expert_blocks", torch.zeros(nnz, dtype=torch.int64))
        self.register_buffer("expert_scales", torch.zeros(nnz, dtype=torch.float32))
        self._table = None  # (E, R) built from the lists on first use (weights load after __init__)

    def block_scale(self) -> torch.Tensor:
        table = self._table
        if table is None or table.device != self.expert_blocks.device:
            table = self._table = expert_block_scale(self.expert_offsets, self.expert_blocks, self.expert_scales, self.routed_gate.shape[0])
            self._shared_is_one = bool((self.shared_scale == 1).all())
        return table

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._table = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.hidden_size)  # (T, d)
        top_w, top_i = route(xf, self.router_weight, self.top_k, self.routing)  # (T, k)
        out = torch.zeros_like(xf)
        table = self.block_scale()
        if self.shared_gate.shape[0]:
            h = ACTIVATIONS[self.activation](F.linear(xf, self.shared_gate)) * F.linear(xf, self.shared_up)  # (T, S*b)
            if not self._shared_is_one:  # usually every expert gives a shared block gate 1: nothing to mix
                scale = (top_w.unsqueeze(-1) * self.shared_scale[top_i]).sum(dim=-2)  # (T, S)
                h = (h.view(xf.shape[0], -1, self.block_size) * scale.unsqueeze(-1).to(h.dtype)).view(xf.shape[0], -1)
            out = F.linear(h, self.shared_down)
        if self.routed_gate.shape[0]:
            out = out + routed_forward(xf, top_w, top_i, self.routed_gate, self.routed_up, self.routed_down, table, self.activation)
        return out.view(*lead, self.hidden_size)


class SelectFFN(nn.Module):
    """A frozen per-token selector FFN: a token reads the input channels and neurons whose |value| clears
    their threshold: x_s = x * (|x| > x_threshold); (g, u) = x_s @ gate_up; h = act(g) * u;
    y = (h * (|h| > h_threshold)) @ down."""

    def __init__(self, hidden_size: int, section: dict, counts: dict):
        super().__init__()
        d, n = hidden_size, counts["neurons"]
        self.hidden_size, self.activation = d, section["activation"]
        self.gate_up = nn.Parameter(torch.zeros(d, 2 * n), requires_grad=False)
        self.down = nn.Parameter(torch.zeros(n, d), requires_grad=False)
        self.register_buffer("x_threshold", torch.zeros(d, dtype=torch.float32))
        self.register_buffer("h_threshold", torch.zeros(n, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.hidden_size)  # (T, d)
        xs = xf * (xf.abs() > self.x_threshold).to(xf.dtype)
        gu = (xs @ self.gate_up).view(xf.shape[0], -1, 2)  # (T, F', 2) interleaved gate, up
        h = ACTIVATIONS[self.activation](gu[..., 0]) * gu[..., 1]
        h = h * (h.abs() > self.h_threshold).to(h.dtype)
        return (h @ self.down).view(*lead, self.hidden_size)


def _mom_class(base: type) -> type:
    """`base` (a transformers *ForCausalLM) with every decoder layer's FFN replaced by MoMFFN."""

    def __init__(self, config):
        base.__init__(self, config)
        section = config.momcompress
        if section.get("format_version") not in READS_FORMATS:
            raise ValueError(
                f"this modeling file reads momcompress frozen format {READS_FORMATS}, the folder has {section.get('format_version')}: "
                "freeze it again with a current momcompress"
            )
        layers = self.model.layers
        if len(layers) != len(section["layers"]):
            raise ValueError(f"config has {len(layers)} layers but its momcompress section lists {len(section['layers'])}")
        ffn = SelectFFN if section.get("selector") == "activations" else MoMFFN
        for layer, counts in zip(layers, section["layers"]):
            layer.mlp = ffn(config.hidden_size, section, counts)

    name = "MoM" + base.__name__
    keep_fp32 = ["router_weight", "x_threshold", "h_threshold"]
    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name, "_keep_in_fp32_modules_strict": keep_fp32})


def model_class_name(model_type: str) -> str:
    """The class name this file provides for a config model_type (what freeze writes into auto_map)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return "MoM" + MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def __getattr__(name: str):
    """`MoM<Base>ForCausalLM` for any transformers causal LM class, built on first access (auto_map names one)."""
    if name.startswith("MoM") and name.endswith("ForCausalLM"):
        base = getattr(transformers, name[3:], None)
        if base is not None:
            cls = globals()[name] = _mom_class(base)
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
