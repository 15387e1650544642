"""Parameter accounting for dense and frozen MoM models: on disk and active per token.

Per token a decoder reads: one embedding row (d), every attention and norm parameter, the FFN
parameters its routing selects, the router, and the whole lm_head (V x d, tied or not). For a
frozen MoM layer the FFN part is (blocks read) x 3 b d, blocks read = shared + the union of the
routed blocks of the token's top-k experts, measured on real tokens.
"""

from __future__ import annotations

from torch import nn

from momcompress.models import decoder_layers


def _unique_params(module: nn.Module) -> dict[int, int]:
    return {id(p): p.numel() for p in module.parameters()}


def param_breakdown(model: nn.Module) -> dict[str, int]:
    """Parameters by part: embedding, lm_head (0 when tied), ffn (incl. routers), rest (attention, norms)."""
    total = sum(_unique_params(model).values())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_w = head.weight if head is not None else emb
    tied = head_w is emb
    ffn = {}
    for layer in decoder_layers(model):
        ffn.update(_unique_params(layer.mlp))
    # A training-form MoM layer also holds a frozen copy of the original FFN: not part of the model.
    ref = {}
    for layer in decoder_layers(model):
        if getattr(layer.mlp, "reference_mlp", None) is not None:
            ref.update(_unique_params(layer.mlp.reference_mlp))
    ffn_n = sum(v for k, v in ffn.items() if k not in ref)
    emb_n = emb.numel()
    head_n = 0 if tied else head_w.numel()
    return {
        "total": total - sum(ref.values()),
        "embedding": emb_n,
        "lm_head": head_n,
        "tied_embeddings": tied,
        "ffn": ffn_n,
        "rest": total - sum(ref.values()) - ffn_n - emb_n - head_n,
    }


def active_params_per_token(model: nn.Module, ffn_active: int) -> int:
    """Whole-model parameters read per token given the FFN parameters read per token (all layers)."""
    parts = param_breakdown(model)
    d = model.get_input_embeddings().weight.shape[1]
    head = model.get_output_embeddings()
    head_n = (head.weight if head is not None else model.get_input_embeddings().weight).numel()
    return d + parts["rest"] + ffn_active + head_n
