"""The frozen mixture-of-masks FFN: what `freeze` writes and `momcompress.load` runs (DESIGN.md, "Freeze").

One layer holds, for hidden size d, block size b, E experts, S shared and R routed blocks:
    router_weight   (E, d)     fp32 linear router (softmax, top-k, weights renormalised over the top-k)
    shared_gate     (S*b, d)   \
    shared_up       (S*b, d)    } a dense FFN over the shared neurons only (nn.Linear layout)
    shared_down     (d, S*b)   /
    shared_scale    (E, S)     gate value of each shared block in each expert (usually all 1)
    routed_gate     (R, b, d)  the routed blocks, each stored once, gate/up rows per block
    routed_up       (R, b, d)
    routed_down     (R, b, d)  down projection transposed: routed_down[r, i] = W_down[:, neuron]
    expert_offsets  (E+1,)     expert e owns expert_blocks[offsets[e]:offsets[e+1]] (lists may overlap)
    expert_blocks   (nnz,)     indices into the routed blocks
    expert_scales   (nnz,)     gate value of each listed block in that expert
Pruned blocks are not stored. For token t with top-k experts and weights r, block j is scaled by
w[t, j] = sum_e r[t, e] z[e, j] (z the expert's gate value, 0 if the block is not in its list), the
same formula as the training layer, so the frozen layer reproduces it exactly.

Execution paths (FrozenMoMFFN.path forces one; the README's "Which path runs where" table has the
measured crossovers; the shared part is always one dense matmul):
- fused CPU (fp32, up to FUSED_CPU_MAX_TOKENS tokens, Numba installed): kernels/cpu_fused.py multiplies
  the selected neuron rows where they lie, in one compiled call;
- masked (from MASKED_MIN_TOKENS tokens): every routed row in one GEMM each for gate, up and down, each
  token's blocks weighted by its gate values and the others by 0 (no copies; rows padded to ROW_ALIGN);
- union (fewer tokens without the fused kernel): the union of the tokens' experts' blocks, each read
  once (in place when the union covers most routed blocks);
- grouped (the reference; runs only when forced or when masked_min_tokens is raised past decode_max_tokens):
  tokens grouped by expert, each expert's blocks gathered once;
- on CUDA with Triton, the kernels of momcompress.kernels (behind their self-check).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from momcompress.kernels import cpu_fused
from momcompress.kernels.reference import (  # noqa: F401  (re-exported: the reference lives with the kernels)
    ACTIVATIONS,
    HF_ACTIVATIONS,
    block_weights,
    routed_experts_decode,
    routed_experts_grouped,
)

ROUTINGS = ("renormalized", "unit")
INPLACE_ACTIVATIONS = {
    "silu": lambda t: F.silu(t, inplace=True),
    "gelu_tanh": lambda t: t.copy_(F.gelu(t, approximate="tanh")),
    "gelu": lambda t: t.copy_(F.gelu(t)),
}
# Up to this many tokens per call the decode path (union of the tokens' blocks, read once) is used;
# above it, grouping by expert. On a 2-core CPU the union path beat grouping up to at least 64 tokens
# (benchmarks/bench_freeze.py); grouping wins once many tokens share each expert.
DECODE_MAX_TOKENS = 64
# In the choice between grouping tokens by expert and reading the union of their blocks once (CPU /
# reference path): reading (gathering) one block costs about as much as computing this many tokens on it.
BLOCK_READ_TOKENS = 16
# Up to this many tokens (fp32, CPU, Numba installed) the fused CPU kernel runs: it reads each selected
# neuron row once, where it lies, instead of copying the rows first (measured crossover: README).
FUSED_CPU_MAX_TOKENS = 12
# From this many tokens the masked path runs (every routed row multiplied by a dense GEMM, each token's
# blocks weighted, the others by 0): gathering the union of many tokens' blocks copies nearly all of
# them, and grouping by expert copies each expert's blocks, both slower than one GEMM over rows that
# lie in place (measured crossover: README).
MASKED_MIN_TOKENS = 13
# The masked path multiplies routed rows padded (with zero rows) to a multiple of this count.
ROW_ALIGN = 16
# The routed paths without kernels; FrozenMoMFFN.path forces one ("auto": choose_path).
PATHS = ("auto", "fused", "union", "grouped", "masked")


def _kernels_ready(device: torch.device) -> bool:
    try:
        from momcompress.kernels import kernels_available
    except ImportError:
        return False
    return kernels_available(device)


def _tracing() -> bool:
    """True under torch.export / torch.compile / ONNX export: the python paths below branch on data."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.compiler.is_compiling() or exporting() or torch.onnx.is_in_onnx_export()


class FrozenMoMFFN(nn.Module):
    """A frozen MoM FFN (shared dense part + routed blocks + per-expert block lists)."""

    def __init__(
        self,
        hidden_size: int,
        block_size: int,
        num_blocks: int,
        top_k: int,
        num_shared: int,
        num_routed: int,
        expert_sizes: list[int],
        activation: str,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        routing: str = "renormalized",
    ):
        super().__init__()
        d, b, E = hidden_size, block_size, len(expert_sizes)
        if top_k < 1 or top_k > E:
            raise ValueError(f"top_k must be in [1, {E}], got {top_k}")
        self.hidden_size, self.block_size, self.num_blocks, self.top_k, self.num_experts = d, b, num_blocks, top_k, E
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        # "renormalized": top-k softmax weights renormalised to sum to 1 (MoM, as trained);
        # "unit": every selected expert weighs 1 (MoEfication-style experts that partition the FFN).
        self.routing = routing
        self.use_kernels = True  # on CUDA, run the Triton kernels when Triton is installed
        self.decode_max_tokens = DECODE_MAX_TOKENS
        self.fused_cpu_max_tokens = FUSED_CPU_MAX_TOKENS  # 0 turns the fused CPU kernel off
        self.masked_min_tokens = MASKED_MIN_TOKENS
        self.path = "auto"  # or force one of PATHS (benchmarks, tests)

        def param(*shape, dt=dtype):
            return nn.Parameter(torch.zeros(*shape, dtype=dt, device=device), requires_grad=False)

        # The router runs in fp32 whatever the model dtype, as in training: routing must not flip with precision.
        self.router_weight = param(E, d, dt=torch.float32)
        self.shared_gate = param(num_shared * b, d)
        self.shared_up = param(num_shared * b, d)
        self.shared_down = param(d, num_shared * b)
        self.routed_gate = param(num_routed, b, d)
        self.routed_up = param(num_routed, b, d)
        self.routed_down = param(num_routed, b, d)
        nnz = int(sum(expert_sizes))
        offsets = torch.tensor([0] + list(expert_sizes), dtype=torch.int64).cumsum(0)
        self.register_buffer("shared_scale", torch.ones(E, num_shared, dtype=torch.float32, device=device))
        self.register_buffer("expert_offsets", offsets.to(device))
        self.register_buffer("expert_blocks", torch.zeros(nnz, dtype=torch.int64, device=device))
        self.register_buffer("expert_scales", torch.zeros(nnz, dtype=torch.float32, device=device))
        # Derived in refresh(); non-persistent so that .to(device) moves them and files do not store them.
        self.register_buffer("expert_block_scale", torch.zeros(E, num_routed, device=device), persistent=False)
        self.register_buffer("expert_uses", torch.zeros(E, num_routed, dtype=torch.bool, device=device), persistent=False)
        self.track_stats = False
        self._aligned = None  # (gate, up, down) zero-padded row buffers of the masked path (_aligned_rows)
        self.last_ratio: torch.Tensor | None = None  # (T,) fraction of the layer's blocks each token read
        self.refresh()

    # -- derived tables -----------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the tables derived from the stored tensors (call after loading a state dict)."""
        E, R = self.num_experts, self.routed_gate.shape[0]
        dense = torch.zeros(E, R, dtype=torch.float32, device=self.expert_blocks.device)  # (E, R)
        owner = torch.repeat_interleave(torch.arange(E, device=dense.device), self.expert_offsets.diff())
        if len(owner):
            dense.index_put_((owner, self.expert_blocks), self.expert_scales.float(), accumulate=True)
        self.expert_block_scale = dense  # (E, R) gate value of routed block r in expert e (0: not used)
        self.expert_uses = dense != 0  # (E, R)
        scale = self.shared_scale.float()
        # Usually every expert gives a shared block the same scale (1): then no per-token mixing is needed.
        self._shared_uniform = bool((scale == scale[:1]).all()) if scale.numel() else True
        self._shared_is_one = scale.numel() == 0 or bool((scale == 1).all())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()

    def extra_repr(self) -> str:
        S = self.shared_gate.shape[0] // self.block_size
        return (
            f"hidden={self.hidden_size}, block={self.block_size}, blocks={self.num_blocks} "
            f"(shared {S}, routed {self.routed_gate.shape[0]}), experts={self.num_experts}, top_k={self.top_k}"
        )

    # -- forward ------------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, d) -> renormalised top-k weights (T, k) fp32 and expert indices (T, k); as in training."""
        probs = torch.softmax(F.linear(x.float(), self.router_weight.float()), dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        if self.routing == "unit":
            return torch.ones_like(top_p), top_i
        return top_p / top_p.sum(dim=-1, keepdim=True), top_i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.hidden_size)  # (T, d)
        top_w, top_i = self.route(xf)  # (T, k), (T, k)
        out = self.shared_forward(xf, top_w, top_i)  # (T, d)
        if _tracing() or (xf.is_cuda and self.use_kernels and _kernels_ready(xf.device)):
            # The custom op: Triton on CUDA, and one traceable node for torch.export / ONNX export.
            from momcompress.kernels import routed_experts

            out = out + routed_experts(xf, top_w, top_i, self.routed_gate, self.routed_up, self.routed_down, self.expert_block_scale, self.activation)
        else:
            path = self.path if self.path != "auto" else self.choose_path(xf, top_i)
            if path == "fused":
                cpu_fused.routed_experts_rows(
                    xf, top_w, top_i, self.expert_offsets, self.expert_blocks, self.expert_scales,
                    self.routed_gate, self.routed_up, self.routed_down, self.activation, out,
                )
            elif path == "masked":
                self.routed_masked(xf, top_w, top_i, out)
            elif path == "union":
                self.routed_decode(xf, top_w, top_i, out)
            elif path == "grouped":
                self.routed_grouped(xf, top_w, top_i, out)
            else:
                raise ValueError(f"FrozenMoMFFN.path must be one of {PATHS}, got {path!r}")
        if self.track_stats:
            self.last_ratio = self.blocks_read(top_i) / self.num_blocks
        return out.view(*lead, self.hidden_size)

    def choose_path(self, x: torch.Tensor, top_i: torch.Tensor) -> str:
        """The routed path for x (T, d) without kernels, by the measured crossovers (README):
        fused up to fused_cpu_max_tokens tokens, masked from masked_min_tokens, else union or grouped."""
        T = x.shape[0]
        if self._fused_cpu_ok(x):
            return "fused"
        if T >= self.masked_min_tokens:
            return "masked"
        if T <= self.decode_max_tokens or self.union_is_cheaper(top_i):
            return "union"
        return "grouped"

    def _fused_cpu_ok(self, x: torch.Tensor) -> bool:
        """Whether the fused CPU kernel (rows multiplied where they lie, kernels/cpu_fused.py) runs on x."""
        return (
            x.device.type == "cpu" and x.shape[0] <= self.fused_cpu_max_tokens and x.dtype == torch.float32
            and self.routed_gate.dtype == torch.float32 and cpu_fused.available()
            and not (torch.is_grad_enabled() and x.requires_grad) and self.routed_gate.is_contiguous()
            and self.routed_up.is_contiguous() and self.routed_down.is_contiguous() and x.is_contiguous()
        )

    def shared_forward(self, x: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        """The shared blocks as one dense FFN: (T, d) -> (T, d)."""
        if self.shared_gate.shape[0] == 0:
            return torch.zeros_like(x)
        h = ACTIVATIONS[self.activation](F.linear(x, self.shared_gate)) * F.linear(x, self.shared_up)  # (T, S*b)
        if not self._shared_is_one:
            T, b = x.shape[0], self.block_size
            if self._shared_uniform:
                scale = self.shared_scale[0].expand(T, -1)  # (T, S)
            else:
                scale = (top_w.unsqueeze(-1) * self.shared_scale[top_i]).sum(dim=-2)  # (T, S)
            h = (h.view(T, -1, b) * scale.unsqueeze(-1).to(h.dtype)).view(T, -1)
        return F.linear(h, self.shared_down)

    def routed_masked(self, x: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor, out: torch.Tensor) -> None:
        """Add the routed output to out (T, d) as a dense FFN over every routed block, each token's blocks
        weighted by w[t, r] (0 where it has none): three plain matmuls over the stored rows, no copies.

        It computes what the token does not need, but reads each routed row once for all tokens at the
        speed of a dense GEMM; with many tokens the union of their blocks is (nearly) all of them anyway."""
        T = x.shape[0]
        R, b, d = self.routed_gate.shape
        if R == 0:
            return
        w = block_weights(top_w, top_i, self.expert_block_scale).to(x.dtype)  # (T, R)
        gate, up, down = self._aligned_rows()  # (n, d) each, n >= R*b, rows past R*b zero
        g = F.linear(x, gate)  # (T, n)
        u = F.linear(x, up)
        if torch.is_grad_enabled() and (x.requires_grad or self.routed_gate.requires_grad):
            h = (ACTIVATIONS[self.activation](g) * u)[:, : R * b].reshape(T, R, b) * w.unsqueeze(-1)
            out.addmm_(h.reshape(T, R * b), down[: R * b])
            return
        # In place: no new (T, n) temporaries (fresh multi-MB buffers cost page faults on CPU). The
        # padding rows give act(0) * 0 = 0.
        h = INPLACE_ACTIVATIONS[self.activation](g).mul_(u)
        h[:, : R * b].view(T, R, b).mul_(w.unsqueeze(-1))
        out.addmm_(h, down)

    def _aligned_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The routed gate, up and down rows as (n, d) matrices, n = R*b rounded up to ROW_ALIGN rows.

        GEMMs over a row count that is not a multiple of 16 ran 10-20% slower (1532 vs 1536 rows of
        576, fp32, 2 threads; README). The parameters are moved, once, into zero-padded buffers and
        stay views of them (same shapes, state dict and files); a move (.to) or a reload is noticed by
        the data pointers and padded again."""
        params = (self.routed_gate, self.routed_up, self.routed_down)
        R, b, d = self.routed_gate.shape
        n = -(-(R * b) // ROW_ALIGN) * ROW_ALIGN
        if n == R * b or torch.is_grad_enabled() and self.routed_gate.requires_grad:
            return tuple(p.view(R * b, d) for p in params)
        cached = self._aligned
        if cached is not None and all(c.data_ptr() == p.data_ptr() and c.dtype == p.dtype and c.shape[0] == n for c, p in zip(cached, params)):
            return cached
        bufs = []
        with torch.no_grad():
            for p in params:
                buf = torch.zeros(n, d, dtype=p.dtype, device=p.device)
                buf[: R * b].copy_(p.view(R * b, d))
                p.data = buf[: R * b].view(R, b, d)
                bufs.append(buf)
        self._aligned = tuple(bufs)
        return self._aligned

    def routed_grouped(self, x: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor, out: torch.Tensor) -> None:
        """Add the routed experts' output to out (T, d): tokens grouped by expert."""
        out += routed_experts_grouped(x, top_w, top_i, self.routed_gate, self.routed_up, self.routed_down, self.expert_block_scale, self.activation)

    def union_is_cheaper(self, top_i: torch.Tensor) -> bool:
        """Whether reading the union of the tokens' blocks once beats grouping tokens by expert.

        Grouping reads each used expert's blocks again (overlapping experts share blocks) but computes
        each token only on its own experts' blocks; the union reads every needed block once and computes
        every token on all of them. With many experts and few tokens each (64 experts, a 128-token
        prompt) grouping reads the routed weights several times over. Costs in block reads, one read =
        BLOCK_READ_TOKENS tokens of compute.
        """
        T = top_i.shape[0]
        counts = torch.bincount(top_i.reshape(-1), minlength=self.num_experts)
        used = counts > 0
        sizes = self.expert_uses.sum(dim=1)  # (E,) blocks per expert
        grouped = float((sizes[used] * (BLOCK_READ_TOKENS + counts[used])).sum())
        union = float(self.expert_uses[used].any(dim=0).sum()) * (BLOCK_READ_TOKENS + T)
        return union < grouped

    def routed_decode(self, x: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor, out: torch.Tensor) -> None:
        """Add the routed output to out (T, d): the union of the tokens' experts' blocks, read once."""
        out += routed_experts_decode(x, top_w, top_i, self.routed_gate, self.routed_up, self.routed_down, self.expert_block_scale, self.activation)

    def blocks_read(self, top_i: torch.Tensor) -> torch.Tensor:
        """(T,) blocks read per token: the shared ones plus the union of its experts' routed blocks."""
        S = self.shared_gate.shape[0] // self.block_size
        return S + self.expert_uses[top_i].any(dim=-2).sum(dim=-1).float()

    # -- sizes --------------------------------------------------------------------------------------
    def block_params(self) -> int:
        """Parameters of one block: gate, up and down rows."""
        return 3 * self.block_size * self.hidden_size

    def router_params(self) -> int:
        return self.router_weight.numel()


def frozen_layers(model: nn.Module) -> list[FrozenMoMFFN]:
    """All frozen MoM layers of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, FrozenMoMFFN)]
