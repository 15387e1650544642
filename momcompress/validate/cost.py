"""Whole-model cost per token, dense vs frozen MoM: active parameters and FLOPs (DESIGN.md, "Validation").

Pure arithmetic on a ``ModelShape`` (the sizes in a model config), so every number can be checked by
hand. For one token, with vocabulary V, hidden size d, L layers, H query heads and Hkv key/value heads of
size h, FFN width F, context C (the tokens the token attends to, capped by a layer's sliding window):

    attention projections per layer  A = d*H*h (q) + 2*d*Hkv*h (k, v) + H*h*d (o)
    dense FFN per layer              3*d*F                    (gate, up, down)
    MoM FFN per layer                3*d*b*blocks_read_l + E*d (blocks read, block size b; router d -> E)
    active parameters  = d (one embedding row) + L*A + FFN + routers + V*d (lm_head, read whole even when
                         tied to the embedding) + other (norms, biases: counted on the model)
    FLOPs              = 2 * (L*A + FFN + routers + V*d)     (one multiply-add = 2 FLOPs per weight)
                         + sum_l 4*H*h*C_l                    (q.k scores and the weighted sum of values)
Embedding lookups, norms, softmax, activations and residual adds are elementwise and left out: together
well under 1% of the FLOPs of any supported model.

Example::

    shape = ModelShape.from_model(dense_model)
    dense = dense_cost(shape, context=256)
    sparse = mom_cost(shape, blocks_read=[48.1, 40.6, ...], block_size=16, num_experts=16, context=256)
    print(sparse.flops / dense.flops)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

FLOPS_PER_MAC = 2  # one multiply and one add per weight read in a matmul
ATTENTION_MATMULS = 2  # q.k^T scores and scores.V, each H*h multiply-adds per context token


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only LM that its per-token cost depends on.

    Attributes:
        vocab_size: V.
        hidden_size: d.
        num_layers: L.
        num_heads: H query heads.
        num_kv_heads: Hkv key/value heads (grouped-query attention when < H).
        head_dim: h.
        ffn_width: F, the dense FFN's intermediate size.
        tied_embeddings: the lm_head shares the embedding matrix (stored once, still read whole per token).
        other_params: parameters that are neither embedding, lm_head, attention projection weights nor
            FFN weights (norms, attention biases), as counted on the model.
        sliding_windows: per layer, the attention window in tokens, or None for full attention.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_width: int
    tied_embeddings: bool
    other_params: int = 0
    sliding_windows: tuple[int | None, ...] | None = None

    @classmethod
    def from_config(cls, config, other_params: int = 0) -> "ModelShape":
        """The shape a Hugging Face config describes (``other_params`` as given)."""
        d, H = config.hidden_size, config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or d // H
        L = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if window is None or getattr(config, "use_sliding_window", True) is False:
            windows = None
        elif layer_types:
            windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        else:
            windows = (window,) * L  # Mistral: every layer slides
        return cls(
            vocab_size=config.vocab_size, hidden_size=d, num_layers=L, num_heads=H,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or H, head_dim=head_dim,
            ffn_width=config.intermediate_size, tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            other_params=other_params, sliding_windows=windows,
        )

    @classmethod
    def from_model(cls, model) -> "ModelShape":
        """The shape of a dense model, with ``other_params`` = its parameters minus the formula's parts."""
        shape = cls.from_config(model.config)
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        other = total - shape.stored_params(include_other=False)
        if other < 0:
            raise ValueError(f"the model has {total} parameters, fewer than its config implies: not a dense model")
        return cls(**{**asdict(shape), "other_params": other})

    # -- parts ---------------------------------------------------------------------------------------
    @property
    def attention_weights_per_layer(self) -> int:
        """A = d*H*h + 2*d*Hkv*h + H*h*d: the q, k, v and o projection weights of one layer."""
        d, h = self.hidden_size, self.head_dim
        return d * self.num_heads * h + 2 * d * self.num_kv_heads * h + self.num_heads * h * d

    @property
    def dense_ffn_per_layer(self) -> int:
        """3*d*F: gate, up and down weights of one dense FFN."""
        return 3 * self.hidden_size * self.ffn_width

    @property
    def lm_head(self) -> int:
        """V*d."""
        return self.vocab_size * self.hidden_size

    def stored_params(self, include_other: bool = True) -> int:
        """Parameters of the dense model as stored (a tied lm_head counted once)."""
        emb = self.lm_head
        head = 0 if self.tied_embeddings else self.lm_head
        body = self.num_layers * (self.attention_weights_per_layer + self.dense_ffn_per_layer)
        return emb + head + body + (self.other_params if include_other else 0)

    def context_per_layer(self, context: int) -> list[int]:
        """Tokens each layer attends to for a token at position `context` (a sliding window caps it)."""
        windows = self.sliding_windows or (None,) * self.num_layers
        return [context if w is None else min(context, w) for w in windows]


@dataclass(frozen=True)
class TokenCost:
    """Parameters read and FLOPs for one token, by part.

    Attributes:
        embedding: parameters read from the embedding (one row: d).
        attention: attention projection weights of all layers (L*A).
        ffn: FFN weights read, all layers (dense: L*3*d*F; MoM: shared + routed blocks read).
        router: router weights, all layers (L*E*d; 0 for a dense model).
        lm_head: V*d.
        other: norms and biases.
        attention_flops: the q.k and scores.V matmuls at the stated context, all layers.
        context: the context length those FLOPs assume.
    """

    embedding: int
    attention: int
    ffn: int
    router: int
    lm_head: int
    other: int
    attention_flops: int
    context: int

    @property
    def params(self) -> int:
        """Whole-model parameters read per token."""
        return self.embedding + self.attention + self.ffn + self.router + self.lm_head + self.other

    @property
    def flops(self) -> int:
        """Whole-model FLOPs per token: 2 per weight of every matmul, plus the attention matmuls."""
        return FLOPS_PER_MAC * (self.attention + self.ffn + self.router + self.lm_head) + self.attention_flops

    def to_dict(self) -> dict:
        """Every part, plus the totals ``params`` and ``flops``."""
        return {**asdict(self), "params": self.params, "flops": self.flops}


def attention_context_flops(shape: ModelShape, context: int) -> int:
    """sum over layers of 4*H*h*C_l: scores q.k (H*h per key) and the value sum (H*h per value), x2 FLOPs."""
    if context < 1:
        raise ValueError(f"context must be at least 1 token, got {context}")
    per_key = FLOPS_PER_MAC * ATTENTION_MATMULS * shape.num_heads * shape.head_dim
    return sum(per_key * c for c in shape.context_per_layer(context))


def _cost(shape: ModelShape, ffn: float, router: int, context: int) -> TokenCost:
    return TokenCost(
        embedding=shape.hidden_size,
        attention=shape.num_layers * shape.attention_weights_per_layer,
        ffn=int(round(ffn)),
        router=router,
        lm_head=shape.lm_head,
        other=shape.other_params,
        attention_flops=attention_context_flops(shape, context),
        context=context,
    )


def dense_cost(shape: ModelShape, context: int) -> TokenCost:
    """Per-token cost of the dense model: every FFN weight is read."""
    return _cost(shape, shape.num_layers * shape.dense_ffn_per_layer, 0, context)


def ratio_cost(shape: ModelShape, ratio_per_layer: list[float], context: int, selector: int = 0) -> TokenCost:
    """Per-token cost of a model whose FFNs read a measured fraction of their weights: layer l reads
    ratio[l] x 3 F d FFN parameters. `selector` is what choosing them reads besides (the per-token
    selector's and WINA's per-entry thresholds, d + F' per layer; TEAL's two scalars per layer), counted
    where a router would be."""
    if len(ratio_per_layer) != shape.num_layers:
        raise ValueError(f"ratio_per_layer has {len(ratio_per_layer)} layers, the model {shape.num_layers}")
    ffn = sum(3 * shape.ffn_width * shape.hidden_size * r for r in ratio_per_layer)
    return _cost(shape, ffn, selector, context)


def mom_cost(shape: ModelShape, blocks_read: list[float], block_size: int, num_experts: int, context: int) -> TokenCost:
    """Per-token cost of a frozen MoM model.

    Args:
        shape: the dense model's shape (attention, embeddings and norms are unchanged by MoM).
        blocks_read: per layer, the mean number of FFN blocks a token reads (shared + the union of its
            experts' routed blocks), measured on real tokens.
        block_size: neurons per block, b; one block is 3*b*d weights.
        num_experts: E; each layer's router is an E x d matrix.
        context: tokens attended to, for the attention FLOPs.
    """
    if len(blocks_read) != shape.num_layers:
        raise ValueError(f"blocks_read has {len(blocks_read)} layers, the model {shape.num_layers}")
    ffn = sum(3 * block_size * shape.hidden_size * blocks for blocks in blocks_read)
    return _cost(shape, ffn, shape.num_layers * num_experts * shape.hidden_size, context)
