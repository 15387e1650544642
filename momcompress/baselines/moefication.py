"""MoEfication baseline: split each dense FFN into E equal, disjoint experts plus a learned router.

MoEfication (Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts"):
1. Cluster the F neurons of a layer into E balanced groups. We use co-activation clustering: balanced
   spherical k-means on each neuron's activation profile |act(W_gate x) * (W_up x)| over calibration
   tokens (each token's row normalised by its mean, so a few huge-activation tokens do not dominate),
   so neurons that fire on the same tokens share an expert. Balanced = exactly F / E neurons each
   (greedy assignment to the nearest centroid with room, most decided neurons first).
2. Permute the neurons so every expert is a contiguous range (gate/up rows and down columns move
   together: the dense output is unchanged), so expert e = blocks [e n, (e+1) n) of the frozen format.
3. Train a router per layer on the dense model's FFN inputs to predict which experts carry the most
   activation mass (sum over the expert's neurons of |act(W_gate x) * (W_up x)|): BCE between the
   router's logits and the token's top-k experts by mass. The paper's router is a 2-layer MLP; the
   frozen runtime's router is linear (E, d) + softmax + top-k, so ours is a linear router trained on
   the same target (an MLP router needs a runtime change).
4. Each token uses its top-k experts with weight 1 each (routing "unit": MoEfication sums the selected
   experts' outputs), so the fraction of FFN parameters read is exactly k / E.

Math only: no file I/O (the driver in base.py writes the folder).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from momcompress.errors import ConfigError, UnsupportedArchitectureError
from momcompress.learn.init import balanced_kmeans
from momcompress.models import permute_ffn

PREFERRED_EXPERTS = 16  # E when several expert counts meet the target equally well
TARGET_SLACK = 0.005  # |k / E - target| accepted as meeting the target when choosing E
CLUSTER_TOKENS = 4096  # calibration tokens whose activation profiles are clustered
KMEANS_ITERS = 15
ROUTER_EPOCHS = 8  # passes over the training tokens, and at least ROUTER_MIN_STEPS steps
ROUTER_MIN_STEPS = 600
ROUTER_LR = 1e-2  # Adam, decayed linearly to 0
ROUTER_BATCH = 256
ROUTER_VALID_FRACTION = 0.1  # calibration tokens held back to report router quality
CHUNK = 4096  # tokens per FFN recomputation chunk


def choose_experts(num_blocks: int, target: float, experts: int | None = None) -> tuple[int, int]:
    """(E, k): E dividing the block count (experts are whole block ranges) with k / E nearest the target.

    Among the E within TARGET_SLACK of the target (else the nearest), the one closest to
    PREFERRED_EXPERTS. With `experts` given, only k is chosen.
    """
    def top_k(e: int) -> int:
        return min(e, max(1, round(target * e)))

    if experts is not None:
        if experts < 2 or num_blocks % experts:
            divisors = [e for e in range(2, num_blocks + 1) if num_blocks % e == 0]
            raise ConfigError(f"--experts must divide the {num_blocks} FFN blocks per layer and be >= 2; use one of {divisors}")
        return experts, top_k(experts)
    candidates = [e for e in range(2, num_blocks + 1) if num_blocks % e == 0]
    if not candidates:
        raise ConfigError(f"{num_blocks} FFN block(s) per layer cannot form 2 or more experts: lower --block-size")
    err = {e: abs(top_k(e) / e - target) for e in candidates}
    pool = [e for e in candidates if err[e] <= TARGET_SLACK] or [min(candidates, key=lambda e: (err[e], abs(math.log(e / PREFERRED_EXPERTS))))]
    e = min(pool, key=lambda e: (abs(math.log(e / PREFERRED_EXPERTS)), e))
    return e, top_k(e)


def expert_permutation(labels: torch.Tensor) -> torch.Tensor:
    """Neuron order (F,) that puts expert 0's neurons first, then expert 1's, ... (stable within an expert)."""
    return torch.argsort(labels, stable=True)


def activations(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """|act(W_gate x) * (W_up x)| of a gated FFN, fp32: (T, d) -> (T, F), in chunks of CHUNK tokens."""
    w = mlp.gate_proj.weight
    out = []
    for start in range(0, len(x), CHUNK):
        xc = x[start : start + CHUNK].to(device=w.device, dtype=w.dtype)
        out.append((mlp.act_fn(mlp.gate_proj(xc)) * mlp.up_proj(xc)).abs().float().cpu())
    return torch.cat(out)


def expert_mass(mlp: nn.Module, x: torch.Tensor, labels: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, E) activation mass of each expert: sum over its neurons of |act(W_gate x) * (W_up x)|."""
    onehot = F.one_hot(labels, num_experts).float()  # (F, E)
    return torch.cat([activations(mlp, x[s : s + CHUNK]) @ onehot for s in range(0, len(x), CHUNK)])


def train_router(x: torch.Tensor, mass: torch.Tensor, top_k: int, seed: int, epochs: int = ROUTER_EPOCHS) -> tuple[torch.Tensor, dict]:
    """Linear router (E, d) fp32 whose top-k logits predict the top-k experts by mass.

    Args:
        x: (T, d) FFN inputs of the dense model.
        mass: (T, E) expert activation mass of the same tokens.
        top_k: experts per token.
        seed: data order.
        epochs: passes over the training tokens (at least ROUTER_MIN_STEPS minibatches).
    Returns:
        (router weight (E, d), {"recall": share of the true top-k found, "mass_captured": mass of the
        chosen experts / mass of the true top-k}, both on ROUTER_VALID_FRACTION of held-back tokens).
    """
    g = torch.Generator().manual_seed(seed)
    T, E = mass.shape
    order = torch.randperm(T, generator=g)
    n_valid = max(1, int(T * ROUTER_VALID_FRACTION)) if T >= 10 else 0
    valid, train = order[:n_valid], order[n_valid:]
    x = x.float()
    scale = x[train].pow(2).mean(0).sqrt().clamp_min(1e-6)  # (d,) per-channel RMS: the optimiser sees unit-scale inputs
    xn = x / scale
    labels = torch.zeros(T, E).scatter_(1, mass.topk(top_k, dim=1).indices, 1.0)  # (T, E) multi-hot true top-k
    w = torch.zeros(E, x.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w], lr=ROUTER_LR)
    steps = max(ROUTER_MIN_STEPS, epochs * math.ceil(len(train) / ROUTER_BATCH))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (256, d) x (d, E) steps: thread hand-offs cost more than they save
    try:
        with torch.enable_grad():  # callers run under no_grad
            for _ in range(steps):
                idx = train[torch.randint(len(train), (min(ROUTER_BATCH, len(train)),), generator=g)]
                loss = F.binary_cross_entropy_with_logits(xn[idx] @ w.T, labels[idx])  # (B, E) vs multi-hot top-k
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    router = (w.detach() / scale).contiguous()  # logits = (x / s) w^T = x (w / s)^T
    check = valid if n_valid else train
    return router, router_quality(router, x[check], mass[check], top_k)


@torch.no_grad()
def router_quality(router: torch.Tensor, x: torch.Tensor, mass: torch.Tensor, top_k: int) -> dict:
    """How well the router's top-k matches the true top-k by mass: recall and share of the best mass captured."""
    chosen = (x.float() @ router.T).topk(top_k, dim=1).indices  # (T, k)
    best = mass.topk(top_k, dim=1)
    hit = (chosen.unsqueeze(-1) == best.indices.unsqueeze(1)).any(-1).float().mean()
    captured = mass.gather(1, chosen).sum(1) / best.values.sum(1).clamp_min(1e-12)
    return {"recall": float(hit), "mass_captured": float(captured.mean())}


@torch.no_grad()
def collect_ffn_inputs(model, seqs: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Per decoder layer, the dense FFN inputs of all tokens of seqs (S, L): a list of (S*L, d) fp16 CPU tensors."""
    from momcompress.models import decoder_layers

    layers = decoder_layers(model)
    xs: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda m, args, i=i: xs[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).half().cpu()))
        for i, layer in enumerate(layers)
    ]
    device = next(model.parameters()).device
    base = getattr(model, "model", model)  # the lm_head's logits are not needed
    try:
        for start in tqdm(range(0, len(seqs), batch_size), desc="moefication: dense activations", unit="batch", leave=False):
            base(input_ids=seqs[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(chunks) for chunks in xs]


@torch.no_grad()
def moefy(model, seqs: torch.Tensor, target: float, block_size: int, experts: int | None, batch_size: int, seed: int) -> dict:
    """Replace every FFN of model (in place) by a FrozenMoMFFN of E disjoint experts with a trained router.

    Args:
        model: a dense causal LM (supported architecture).
        seqs: (S, L) calibration windows.
        target: fraction of FFN parameters read per token to aim at (k / E).
        block_size: neurons per block of the frozen format; F / E must be a multiple of it.
        experts: E (None: chosen by choose_experts).
        batch_size: windows per forward pass.
        seed: clustering and router training seed.
    Returns:
        What the frozen config and manifest record: E, k, per-layer plans and router quality.
    """
    from momcompress.modelio import detect_activation
    from momcompress.freeze.plan import plan_layer, repack_layer
    from momcompress.models import decoder_layers

    layers = decoder_layers(model)
    if any(p.bias is not None for layer in layers for p in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)):
        raise UnsupportedArchitectureError("the frozen expert format has no FFN biases: this model's FFN (mlp_bias) cannot be split into experts")
    width = layers[0].mlp.gate_proj.out_features
    if width % block_size:
        raise ConfigError(f"--block-size {block_size} does not divide the FFN width {width}")
    N = width // block_size
    E, k = choose_experts(N, target, experts)
    per_expert = N // E
    activation = detect_activation(layers[0].mlp.act_fn)
    inputs = collect_ffn_inputs(model, seqs, batch_size)
    g = torch.Generator().manual_seed(seed)
    gates = torch.zeros(E, N)  # (E, N) expert e = blocks [e n, (e+1) n)
    for e in range(E):
        gates[e, e * per_expert : (e + 1) * per_expert] = 1.0
    plan = plan_layer(gates)
    quality = []
    for i, layer in enumerate(tqdm(layers, desc="moefication: cluster + router", unit="layer")):
        mlp, x = layer.mlp, inputs[i]
        profile = activations(mlp, x[:: max(1, len(x) // CLUSTER_TOKENS)][:CLUSTER_TOKENS])  # (S_c, F)
        profile = profile / profile.mean(dim=1, keepdim=True).clamp_min(1e-12)  # each token's row at mean 1
        labels = balanced_kmeans(profile.T, E, KMEANS_ITERS, g)  # (F,)
        mass = expert_mass(mlp, x, labels, E)  # (T, E)
        router, q = train_router(x, mass, k, seed + i)
        quality.append(q)
        permute_ffn(mlp, expert_permutation(labels))
        layer.mlp = repack_layer(mlp, router, plan, k, block_size, activation, routing="unit")
        inputs[i] = None  # free the layer's activations as we go
    return {
        "num_experts": E,
        "top_k": k,
        "block_size": block_size,
        "num_blocks": N,
        "activation": activation,
        "plans": [plan] * len(layers),
        "router_quality": quality,
    }
