"""Kernels for the frozen MoM FFN's routed experts, as one PyTorch custom op (DESIGN.md, "Runtime and kernels").

`routed_experts` is `torch.ops.momcompress.routed_experts`: on CUDA it runs the Triton kernels of
`momcompress.kernels.triton_mom`, on any other device the torch reference of
`momcompress.kernels.reference`; its fake implementation keeps models traceable by torch.export,
torch.onnx and torch.compile. Triton is optional and imported only when a CUDA call needs it, so this
package imports without it (`pip install 'momcompress[triton]'` adds it).

    from momcompress.kernels import kernels_available, routed_experts
    if kernels_available(x.device):
        y = routed_experts(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, "silu")
"""

from __future__ import annotations

import functools

import torch

from momcompress.errors import MomcompressError
from momcompress.kernels import reference

# Up to this many tokens the reference reads the union of the tokens' blocks once; above it, it groups by expert.
REFERENCE_DECODE_MAX_TOKENS = 64

__all__ = ["kernels_available", "routed_experts"]


class TritonNotInstalledError(MomcompressError, ImportError):
    """The Triton kernels were asked for on a CUDA device but Triton is not installed."""


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_available(device: torch.device) -> bool:
    """True when the Triton kernels can run on device: a CUDA device with Triton installed."""
    return torch.device(device).type == "cuda" and _triton_importable()


def _triton_mom():
    """The kernel module, imported on first use (it imports triton)."""
    try:
        from momcompress.kernels import triton_mom
    except ImportError as err:
        raise TritonNotInstalledError(
            f"the MoM Triton kernels need Triton ({err}); install it with: pip install 'momcompress[triton]' "
            "(or set use_kernels = False on the FrozenMoMFFN layers to run the torch reference)"
        ) from err
    return triton_mom


@torch.library.custom_op("momcompress::routed_experts", mutates_args=())
def routed_experts(
    x: torch.Tensor,
    top_w: torch.Tensor,
    top_i: torch.Tensor,
    routed_gate: torch.Tensor,
    routed_up: torch.Tensor,
    routed_down: torch.Tensor,
    expert_block_scale: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Routed part of a frozen MoM FFN: (T, d) -> (T, d); the contract of reference.routed_experts_grouped.

    Args:
        x: (T, d) FFN input. top_w: (T, k) fp32 renormalised router weights. top_i: (T, k) expert ids.
        routed_gate, routed_up, routed_down: (R, b, d) routed blocks (down transposed).
        expert_block_scale: (E, R) fp32 gate value of block r in expert e (0: not used).
        activation: "silu", "gelu_tanh" or "gelu".
    """
    # Default (CPU and any non-CUDA device): the torch reference.
    fn = reference.routed_experts_decode if x.shape[0] <= REFERENCE_DECODE_MAX_TOKENS else reference.routed_experts_grouped
    return fn(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation)


@routed_experts.register_kernel("cuda")
def _routed_experts_cuda(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation):
    return _triton_mom().routed_experts_triton(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation)


@routed_experts.register_fake
def _routed_experts_fake(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation):
    torch._check(x.dim() == 2 and routed_gate.dim() == 3, lambda: "routed_experts expects x (T, d) and blocks (R, b, d)")
    torch._check(x.shape[1] == routed_gate.shape[2], lambda: f"hidden size mismatch: x {tuple(x.shape)}, blocks {tuple(routed_gate.shape)}")
    torch._check(top_w.shape == top_i.shape, lambda: "top_w and top_i must both be (T, k)")
    return torch.empty_like(x)  # (T, d)
