"""Kernels for the frozen MoM FFN's routed experts, as one PyTorch custom op (DESIGN.md, "Runtime and kernels").

No silent corruption on an unverified device: the first time the Triton path runs for a (device, dtype,
path, block size, activation), it runs itself on a small random problem and compares with the torch
reference; on a mismatch (or an error) it warns once, naming the kernel and the error, and that class
of calls runs the torch reference from then on. The environment variable MOMCOMPRESS_KERNELS overrides:
`check` (default), `trust` (no check) or `off` (always the torch reference).

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
import os
import warnings
from typing import Callable

import torch

from momcompress.errors import MomcompressError
from momcompress.kernels import reference

# Up to this many tokens the reference reads the union of the tokens' blocks once; above it, it groups by expert.
REFERENCE_DECODE_MAX_TOKENS = 64

__all__ = ["KernelCheckWarning", "kernel_mode", "kernels_available", "routed_experts", "run_checked"]

KERNEL_MODES = ("check", "trust", "off")
# Self-check tolerance: max abs error relative to the reference output's largest magnitude (fp32 is exact up
# to summation order; 16-bit inputs also round h and the output). The same bounds as tests/test_kernels.py.
CHECK_RTOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


class TritonNotInstalledError(MomcompressError, ImportError):
    """The Triton kernels were asked for on a CUDA device but Triton is not installed."""


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class KernelModeError(MomcompressError, ValueError):
    """MOMCOMPRESS_KERNELS holds an unknown value."""


class KernelCheckWarning(UserWarning):
    """A kernel failed its self-check against the torch reference; the torch reference runs instead."""


def kernel_mode() -> str:
    """MOMCOMPRESS_KERNELS: "check" (default: verify each kernel once per device, dtype and shape class),
    "trust" (run the kernels unverified) or "off" (always the torch reference)."""
    mode = os.environ.get("MOMCOMPRESS_KERNELS", "check").strip().lower() or "check"
    if mode not in KERNEL_MODES:
        raise KernelModeError(f"MOMCOMPRESS_KERNELS={mode!r} is not one of {', '.join(KERNEL_MODES)}; unset it for the default (check)")
    return mode


# (device, dtype, path, block size, activation) -> None when the kernel matched the reference, else why not.
_verdicts: dict[tuple, str | None] = {}


def _check_problem(x, top_i, routed_gate, expert_block_scale, tokens: int):
    """A small random problem like the real one (same device, dtype, d, b, activation; few blocks, ragged
    experts, tokens tokens): the argument tuple of routed_experts without the activation."""
    g = torch.Generator().manual_seed(0)
    d, b = x.shape[1], routed_gate.shape[1]
    E = max(2, min(expert_block_scale.shape[0], 8))
    k = max(1, min(top_i.shape[1], E - 1))
    R = max(4, 64 // b)
    gate, up, down = (torch.randn(R, b, d, generator=g) / d**0.5 for _ in range(3))  # (R, b, d)
    scale = torch.zeros(E, R)  # (E, R) ragged: expert e uses a random subset, the last expert none
    for e in range(E - 1):
        used = torch.randperm(R, generator=g)[: 1 + e * R // E]
        scale[e, used] = 0.5 + 0.5 * torch.rand(len(used), generator=g)
    top_i_c = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)]).to(top_i.dtype)  # (T, k)
    top_w = torch.softmax(torch.randn(tokens, k, generator=g), dim=-1)  # (T, k)
    xs = torch.randn(tokens, d, generator=g)
    dev, dt = x.device, x.dtype
    return (xs.to(dev, dt), top_w.to(dev), top_i_c.to(dev), gate.to(dev, dt), up.to(dev, dt), down.to(dev, dt), scale.to(dev))


def _self_check(kernel: Callable, name: str, args: tuple, activation: str) -> str | None:
    """Run kernel on args and compare with the reference (fp32, CPU): None if it matches, else the error."""
    try:
        out = kernel(*args, activation)
    except Exception as err:  # a kernel that cannot compile or launch here is as unusable as a wrong one
        return f"{name} raised {type(err).__name__}: {err}"
    x = args[0]
    cpu = [a.cpu() for a in args]
    ref = reference.routed_experts_grouped(cpu[0].float(), cpu[1], cpu[2], *(w.float() for w in cpu[3:6]), cpu[6], activation)
    if out.shape != ref.shape:
        return f"{name} returned shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    err = (out.float().cpu() - ref).abs().max().item()
    tol = CHECK_RTOL.get(x.dtype, 2e-2) * max(ref.abs().max().item(), 1e-6)
    if not err <= tol:  # also catches NaN
        return f"{name} differs from the torch reference: max abs error {err:.3g} > {tol:.3g}"
    return None


def run_checked(kernel: Callable, name: str, path: str, check_tokens: int, x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation: str):
    """kernel(x, ..., activation) if it is trusted or passed its self-check for this class of calls, else the reference.

    Args:
        kernel: a launcher with routed_experts' contract. name: how a warning names it. path: the shape
            class it serves ("decode", "grouped"). check_tokens: token count of its self-check problem.
        x, ... activation: the call (see routed_experts).
    """
    mode = kernel_mode()
    args = (x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale)
    if mode == "off":
        return _reference(*args, activation)
    if mode == "check":
        key = (str(x.device), x.dtype, path, routed_gate.shape[1], activation)
        if key not in _verdicts:
            problem = _check_problem(x, top_i, routed_gate, expert_block_scale, check_tokens)
            verdict = _verdicts[key] = _self_check(kernel, name, problem, activation)
            if verdict is not None:
                device, dtype, _, b, _ = key
                warnings.warn(
                    f"momcompress: {verdict} (self-check on {device}, {dtype}, block size {b}, {activation}); "
                    f"this class of calls runs the torch reference instead (slower, correct). Please report it with "
                    f"your GPU and Triton version; MOMCOMPRESS_KERNELS=trust skips the check, =off never uses the kernels.",
                    KernelCheckWarning,
                    stacklevel=3,
                )
        if _verdicts[key] is not None:
            return _reference(*args, activation)
    return kernel(*args, activation)


def _reference(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation):
    fn = reference.routed_experts_decode if x.shape[0] <= REFERENCE_DECODE_MAX_TOKENS else reference.routed_experts_grouped
    return fn(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation)


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
    return _reference(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation)


@routed_experts.register_kernel("cuda")
def _routed_experts_cuda(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation):
    if kernel_mode() == "off":
        return _reference(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation)
    tm = _triton_mom()
    tm.check_arguments(x, routed_gate, routed_up, routed_down, activation)
    if x.shape[0] <= tm.DECODE_KERNEL_MAX_TOKENS:
        kernel, name, path, tokens = tm.routed_experts_decode_triton, "the Triton decode kernel (routed_experts_decode_triton)", "decode", 3
    else:
        kernel, name, path, tokens = tm.routed_experts_grouped_triton, "the Triton grouped kernels (routed_experts_grouped_triton)", "grouped", tm.DECODE_KERNEL_MAX_TOKENS + 5
    return run_checked(kernel, name, path, tokens, x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation)


@routed_experts.register_fake
def _routed_experts_fake(x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, activation):
    torch._check(x.dim() == 2 and routed_gate.dim() == 3, lambda: "routed_experts expects x (T, d) and blocks (R, b, d)")
    torch._check(x.shape[1] == routed_gate.shape[2], lambda: f"hidden size mismatch: x {tuple(x.shape)}, blocks {tuple(routed_gate.shape)}")
    torch._check(top_w.shape == top_i.shape, lambda: "top_w and top_i must both be (T, k)")
    return torch.empty_like(x)  # (T, d)
