"""The routed-experts kernels and custom op (momcompress.kernels) against the torch reference.

Without CUDA the Triton kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1 is set
below, before the kernels are first imported); with CUDA the same tests run on the GPU. Tests that need
Triton fail on Linux when it is not installed (it is in the test extra) and are skipped elsewhere.

    python -m pytest -q tests/test_kernels.py              # CPU (interpreter), about 15 s on 2 cores
    python -m pytest -q -m gpu tests/test_kernels.py       # GPU: default and large model shapes
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from momcompress.runtime.mom_ffn import FrozenMoMFFN, routed_experts_grouped

INTERPRET = not torch.cuda.is_available()
if INTERPRET:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import (triton.jit reads it)
DEVICE = "cpu" if INTERPRET else "cuda"
# Triton 3.6's interpreter warns about numpy scalar conversions on every launch.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# Output tolerance relative to the output's largest magnitude: fp32 is exact up to summation order;
# 16-bit inputs also round h (grouped path) and the output.
RTOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_problem(T, d, b, R, E, k, dtype=torch.float32, device="cpu", seed=0, dead_tokens=False):
    """Random routed blocks, ragged expert block lists with fractional scales, and a routing.

    The last expert uses no block; with dead_tokens the last k experts use none and token 0 is routed
    to exactly those, so it reads nothing. Returns the argument tuple of routed_experts (no activation).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    gate, up, down = (torch.randn(R, b, d, generator=g) / d**0.5 for _ in range(3))  # (R, b, d)
    scale = torch.zeros(E, R)  # (E, R)
    for e in range(E):
        used = torch.randperm(R, generator=g)[: int(torch.randint(1, R + 1, (1,), generator=g))]
        scale[e, used] = 0.1 + 0.9 * torch.rand(len(used), generator=g)
    empty = k if dead_tokens else 1
    scale[E - empty :] = 0
    top_i = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # (T, k)
    if dead_tokens:
        top_i[0] = torch.arange(E - k, E)
    top_w = torch.softmax(torch.randn(T, k, generator=g), dim=-1)  # (T, k), sums to 1
    x, gate, up, down = (t.to(dtype) for t in (x, gate, up, down))
    return tuple(t.to(device) for t in (x, top_w, top_i, gate, up, down, scale))


def reference(args, activation):
    """routed_experts_grouped in fp32 on the (already rounded) inputs, on CPU."""
    x, top_w, top_i, gate, up, down, scale = (t.cpu() for t in args)
    return routed_experts_grouped(x.float(), top_w, top_i, gate.float(), up.float(), down.float(), scale, activation)


def assert_matches(out, args, activation):
    x = args[0]
    assert out.shape == x.shape and out.dtype == x.dtype
    ref = reference(args, activation)
    atol = RTOL[x.dtype] * max(ref.abs().max().item(), 1e-6)
    err = (out.float().cpu() - ref).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol:.3g} (output scale {ref.abs().max().item():.3g})"


def kernels():
    """The Triton kernel module. Triton is part of the test extra on Linux: missing there, the tests fail
    (they used to skip, and a CI without Triton passed without testing a kernel)."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        if sys.platform.startswith("linux"):
            pytest.fail(f"Triton is not importable ({err}): install the test extra, pip install -e '.[test]'")
        pytest.skip(f"Triton is not available on {sys.platform}")
    from momcompress.kernels import triton_mom

    return triton_mom


# (T, d, b, R, E, k, dtype, activation, dead_tokens, tiles): small shapes, ragged experts, an expert with
# no block in every case; every block size the runtime supports (1, 2, 4, 16 and one not a power of two)
# with k = 1..4; tiles smaller than the shape force the multi-tile loops and the split reduction.
DECODE_CASES = [
    (1, 32, 1, 40, 4, 1, torch.float32, "silu", False, None),
    (3, 64, 1, 48, 8, 3, torch.float32, "gelu", True, dict(block_n=4, block_d=32, block_k=8, split=5)),
    (4, 64, 1, 64, 6, 4, torch.bfloat16, "silu", False, None),
    (2, 32, 2, 24, 4, 2, torch.float32, "gelu_tanh", False, dict(block_n=8, block_d=16, block_k=4, split=3)),
    (5, 64, 2, 20, 5, 4, torch.float16, "silu", True, None),
    (1, 64, 4, 12, 3, 3, torch.float32, "silu", False, dict(block_n=4, block_d=64, block_k=8, split=2)),
    (16, 32, 4, 16, 8, 2, torch.bfloat16, "gelu", False, None),
    (1, 32, 8, 3, 2, 1, torch.float32, "silu", False, None),
    (3, 64, 16, 12, 4, 2, torch.float32, "gelu_tanh", True, dict(block_n=64, block_d=64, block_k=16, split=4)),
    (16, 64, 16, 12, 8, 4, torch.float32, "gelu", False, dict(block_n=64, block_d=64)),
    (1, 64, 16, 12, 2, 2, torch.float32, "silu", False, dict(block_n=4, block_d=32, block_k=4, split=7)),
    (3, 32, 16, 12, 8, 3, torch.float16, "silu", True, dict(block_n=32, block_d=32)),
    (3, 64, 16, 12, 4, 4, torch.bfloat16, "gelu_tanh", False, dict(block_n=64, block_d=64)),
    (3, 32, 12, 3, 2, 2, torch.float32, "silu", False, dict(block_n=16, block_d=32, block_k=16, split=2)),  # b not a power of two
]
GROUPED_CASES = [
    (1, 32, 1, 40, 4, 1, torch.float32, "gelu", False, None),
    (20, 64, 1, 48, 8, 3, torch.float32, "silu", True, dict(block_m=16, block_n=16, block_k=16)),
    (40, 32, 1, 64, 6, 4, torch.bfloat16, "silu", False, None),
    (24, 32, 2, 24, 4, 2, torch.float32, "gelu_tanh", False, None),
    (20, 64, 2, 20, 5, 4, torch.float16, "silu", True, dict(block_m=16, block_n=32, block_k=16)),
    (17, 64, 4, 12, 3, 3, torch.float32, "silu", False, None),
    (40, 32, 4, 16, 8, 2, torch.bfloat16, "gelu", False, dict(block_m=32, block_n=16, block_k=16)),
    (1, 32, 8, 3, 2, 1, torch.float32, "gelu", False, None),
    (16, 64, 16, 12, 4, 2, torch.float32, "silu", True, None),
    (70, 64, 8, 12, 4, 2, torch.float32, "gelu_tanh", False, dict(block_m=32, block_n=32, block_k=32)),
    (70, 32, 16, 3, 2, 2, torch.bfloat16, "silu", False, None),
    (16, 64, 16, 12, 8, 3, torch.float16, "gelu", True, None),
    (70, 64, 16, 12, 8, 4, torch.bfloat16, "silu", True, dict(block_m=64, block_n=64, block_k=32)),
    (16, 32, 12, 3, 2, 2, torch.float32, "silu", False, dict(block_m=16, block_n=16, block_k=16)),  # b not a power of two
]


def _case_id(case):
    T, d, b, R, E, k, dtype, act, dead, tiles = case
    return f"T{T}-d{d}-b{b}-R{R}-E{E}-k{k}-{str(dtype).split('.')[-1]}-{act}" + ("-dead" if dead else "") + ("-tiles" if tiles else "")


@pytest.mark.parametrize("case", DECODE_CASES, ids=_case_id)
def test_decode_kernel_matches_reference(case):
    T, d, b, R, E, k, dtype, act, dead, tiles = case
    args = make_problem(T, d, b, R, E, k, dtype, DEVICE, dead_tokens=dead)
    out = kernels().routed_experts_decode_triton(*args, act, **(tiles or {}))
    assert_matches(out, args, act)
    if dead:
        assert (out[0] == 0).all()  # token 0's experts use no block


@pytest.mark.parametrize("case", GROUPED_CASES, ids=_case_id)
def test_grouped_kernel_matches_reference(case):
    T, d, b, R, E, k, dtype, act, dead, tiles = case
    args = make_problem(T, d, b, R, E, k, dtype, DEVICE, dead_tokens=dead)
    out = kernels().routed_experts_grouped_triton(*args, act, **(tiles or {}))
    assert_matches(out, args, act)
    if dead:
        assert (out[0] == 0).all()


def test_dispatch_by_token_count(monkeypatch):
    tm = kernels()
    called = []
    monkeypatch.setattr(tm, "routed_experts_decode_triton", lambda x, *a: called.append(("decode", len(x))))
    monkeypatch.setattr(tm, "routed_experts_grouped_triton", lambda x, *a: called.append(("grouped", len(x))))
    for T in (1, tm.DECODE_KERNEL_MAX_TOKENS, tm.DECODE_KERNEL_MAX_TOKENS + 1):
        tm.routed_experts_triton(*make_problem(T, 32, 8, 3, 2, 1), "silu")
    assert called == [("decode", 1), ("decode", 16), ("grouped", 17)]
    with pytest.raises(ValueError, match="activation"):
        tm.routed_experts_triton(*make_problem(1, 32, 8, 3, 2, 1), "relu")


def test_align_tokens_groups_slots_by_expert():
    tm = kernels()
    top_i = torch.tensor([[2, 0], [2, 1], [0, 2]])  # 6 slots; expert 3 gets none
    sorted_slots, block_expert = tm.align_tokens(top_i, num_experts=4, block_m=4)
    pad = top_i.numel()
    # Expert 0: slots 1, 4; expert 1: slot 3; expert 2: slots 0, 2, 5 (each run padded to 4).
    assert sorted_slots[:12].tolist() == [1, 4, pad, pad, 3, pad, pad, pad, 0, 2, 5, pad]
    assert (sorted_slots[12:] == pad).all()
    assert block_expert.tolist()[:4] == [0, 1, 2, 4] and (block_expert[3:] == 4).all()


def test_no_routed_blocks_gives_zeros():
    tm = kernels()
    x, top_w, top_i, gate, up, down, scale = make_problem(3, 32, 8, 3, 2, 1, device=DEVICE)
    empty = gate[:0]  # (0, b, d)
    for launch in (tm.routed_experts_decode_triton, tm.routed_experts_grouped_triton):
        assert (launch(x, top_w, top_i, empty, empty, empty, scale[:, :0], "silu") == 0).all()


COMPILE_CHECK = """
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from momcompress.kernels import triton_mom as tm

if "constexprs" not in inspect.signature(ASTSource).parameters:
    raise SystemExit(f"this Triton's ASTSource differs: {inspect.signature(ASTSource)}; update COMPILE_CHECK and plugins/mom_experts.py")
ptr = dict(x="*bf16", w="*bf16", f="*fp32", i="*i32", l="*i64")
kernels = [
    (tm._decode_plan_kernel, "f l f i f i", "R", dict(K=2, BLOCK_R=256)),
    (tm._decode_gate_up_kernel, "x w w i f i f", "R b d", dict(ACT=1, BLOCK_N=8, BLOCK_D=256)),
    (tm._decode_down_kernel, "f w i i f", "T R b d SPLIT_N", dict(BLOCK_K=8, BLOCK_D=256)),
    (tm._grouped_gate_up_kernel, "x w w f i i i f i x", "TK K E R b d H_WIDTH",
     dict(ACT=2, PREC="tf32", UPCAST=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)),
    (tm._grouped_down_kernel, "x w i i i i f", "TK E R b d H_WIDTH",
     dict(PREC="tf32", UPCAST=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)),
]
for fn, pointers, ints, consts in kernels:
    types = [ptr[p] for p in pointers.split()] + ["i32"] * len(ints.split())
    signature = dict(zip(fn.arg_names, types)) | {name: "constexpr" for name in consts}
    compiled = triton.compile(ASTSource(fn, signature, constexprs=consts), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
    assert compiled.asm["cubin"], fn.__name__
# The AOT plugin's kernel, with the signature and constants its aot_impl gives TensorRT (b = 1 and 16).
from momcompress.plugins import triton_aot
from momcompress.plugins.mom_experts import _aot_signature
for b in (1, 16):
    block_d, block_k, block_n = triton_aot.tiles(4096)
    consts = dict(K=2, B=b, ACT=0, BLOCK_D=block_d, BLOCK_K=block_k, BLOCK_N=block_n)
    compiled = triton.compile(ASTSource(triton_aot.mom_experts_kernel, _aot_signature("bfloat16"), constexprs=consts), target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["ptx"], b
print("ok")
"""


def test_kernels_compile_for_sm90():
    """The kernels compile to sm_90 machine code (Triton's bundled ptxas, no GPU needed): catches what the
    interpreter does not check (types, layouts, constexpr branches). Fails, not skips, on a Triton whose
    compile API differs, so that a Triton upgrade cannot silently drop this check."""
    kernels()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_CHECK], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


# -- the custom op ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [2, 9])  # the decode and grouped references
def test_custom_op_on_cpu_equals_reference(T):
    from momcompress.kernels import routed_experts

    args = make_problem(T, 32, 8, 12, 4, 2)
    out = routed_experts(*args, "silu")
    torch.testing.assert_close(out, routed_experts_grouped(*args, "silu"), atol=1e-6, rtol=1e-5)
    assert torch.ops.momcompress.routed_experts.default is not None


def test_custom_op_opcheck():
    from momcompress.kernels import routed_experts  # noqa: F401  (registers the op)

    for T in (2, 9):
        torch.library.opcheck(torch.ops.momcompress.routed_experts.default, (*make_problem(T, 32, 8, 12, 4, 2), "gelu"))


def test_custom_op_fake_shapes_and_export():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from momcompress.kernels import routed_experts

    args = make_problem(5, 32, 8, 12, 4, 2, dtype=torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = routed_experts(*args, "silu")
    assert out.shape == (5, 32) and out.dtype == torch.bfloat16

    class Routed(torch.nn.Module):
        def forward(self, x, top_w, top_i, gate, up, down, scale):
            return routed_experts(x, top_w, top_i, gate, up, down, scale, "silu")

    program = torch.export.export(Routed(), make_problem(5, 32, 8, 12, 4, 2))
    assert "momcompress.routed_experts" in str(program.graph)


def test_imports_without_triton_nor_the_runtime():
    """momcompress.kernels imports without Triton and without momcompress.runtime (no import cycle: the
    reference lives in kernels/reference.py)."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "import momcompress.kernels as k\n"
        "cycle = [m for m in sys.modules if m.startswith('momcompress.runtime')]\n"
        "assert not cycle, f'momcompress.kernels imports the runtime: {cycle}'\n"
        "assert not k.kernels_available(torch.device('cuda')) and not k.kernels_available(torch.device('cpu'))\n"
        "try:\n"
        "    k._routed_experts_cuda(*[torch.zeros(1)] * 7, 'silu')\n"
        "except k.TritonNotInstalledError as err:\n"
        "    assert \"pip install 'momcompress[triton]'\" in str(err), err\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# -- GPU ------------------------------------------------------------------------------------------------
def _gpu_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return kernels()


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4, 16, 17, 128, 2048])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 4, 16])
def test_gpu_default_model_shape(T, dtype, b):
    """SmolLM2-135M's FFN (d=576, F=1536: 1024 routed neurons over 8 experts, top-2) at block size b."""
    tm = _gpu_kernels()
    args = make_problem(T, 576, b, 1024 // b, 8, 2, dtype, "cuda", dead_tokens=True)
    assert_matches(tm.routed_experts_triton(*args, "silu"), args, "silu")


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16, 512])
@pytest.mark.parametrize("b", [1, 4, 16, 64])
def test_gpu_large_shape_bf16(T, b):
    """A Llama-3-8B-sized FFN (d=4096, F=14336: 12288 routed neurons over 16 experts, top-2) at block size b."""
    tm = _gpu_kernels()
    args = make_problem(T, 4096, b, 12288 // b, 16, 2, torch.bfloat16, "cuda")
    assert_matches(tm.routed_experts_triton(*args, "silu"), args, "silu")


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("b", [1, 16])
def test_gpu_frozen_layer_kernels_match_reference(T, b, fresh_verdicts, recwarn):
    """FrozenMoMFFN.forward with the kernels (behind their self-check, which must pass) equals its torch path."""
    _gpu_kernels()
    d, E = 576, 8
    layer = FrozenMoMFFN(d, b, num_blocks=1536 // b, top_k=2, num_shared=512 // b, num_routed=1024 // b, expert_sizes=[128 // b] * E,
                         activation="silu", dtype=torch.bfloat16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, device="cuda") / d**0.5)
        layer.expert_blocks.copy_(torch.randperm(1024 // b, generator=g, device="cuda"))
        layer.expert_scales.fill_(1.0)
        layer.refresh()
        x = torch.randn(T, d, generator=g, device="cuda", dtype=torch.bfloat16)
        fast = layer(x)
        layer.use_kernels = False
        slow = layer(x)
    assert fresh_verdicts._verdicts and all(v is None for v in fresh_verdicts._verdicts.values()), fresh_verdicts._verdicts
    atol = 2e-2 * slow.float().abs().max().item()
    assert (fast.float() - slow.float()).abs().max().item() <= atol


# -- the self-check (MOMCOMPRESS_KERNELS) ---------------------------------------------------------------
@pytest.fixture
def fresh_verdicts(monkeypatch):
    import momcompress.kernels as k

    monkeypatch.setattr(k, "_verdicts", {})
    monkeypatch.delenv("MOMCOMPRESS_KERNELS", raising=False)
    return k


class CountingKernel:
    """A launcher with routed_experts' contract: the reference, scaled by `factor` (1.0: correct), or raising."""

    def __init__(self, factor=1.0, error=None):
        self.factor, self.error, self.calls = factor, error, 0

    def __call__(self, *args):
        self.calls += 1
        if self.error:
            raise self.error
        return routed_experts_grouped(*args) * self.factor


@pytest.mark.parametrize("broken", [CountingKernel(factor=1.01), CountingKernel(error=RuntimeError("PTX too new"))], ids=["wrong", "raises"])
def test_broken_kernel_is_caught_once_and_falls_back(fresh_verdicts, broken, recwarn):
    k = fresh_verdicts
    args = make_problem(2, 32, 4, 12, 4, 2)
    want = routed_experts_grouped(*args, "silu")
    with pytest.warns(k.KernelCheckWarning, match=r"the broken kernel .*(max abs error|PTX too new).*block size 4"):
        out = k.run_checked(broken, "the broken kernel", "decode", 3, *args, "silu")
    torch.testing.assert_close(out, want)
    assert broken.calls == 1  # the self-check only
    recwarn.clear()
    out = k.run_checked(broken, "the broken kernel", "decode", 3, *make_problem(1, 32, 4, 12, 4, 2, seed=1), "silu")
    assert broken.calls == 1 and not recwarn.list  # remembered: no second check, no second warning
    # Another class of calls (another block size) is checked on its own.
    with pytest.warns(k.KernelCheckWarning):
        k.run_checked(broken, "the broken kernel", "decode", 3, *make_problem(1, 32, 1, 40, 4, 2), "silu")
    assert broken.calls == 2


def test_correct_kernel_passes_its_check(fresh_verdicts, recwarn):
    k = fresh_verdicts
    tm = kernels()
    calls = []

    def decode(*args):
        calls.append(len(args[0]))
        return tm.routed_experts_decode_triton(*args)

    args = make_problem(2, 32, 1, 40, 4, 2)
    out = k.run_checked(decode, "the Triton decode kernel", "decode", 3, *args, "silu")
    assert calls == [3, 2] and not [w for w in recwarn.list if issubclass(w.category, k.KernelCheckWarning)]
    assert_matches(out, args, "silu")


def test_kernel_modes(fresh_verdicts, monkeypatch):
    k = fresh_verdicts
    args = make_problem(2, 32, 4, 12, 4, 2)
    want = routed_experts_grouped(*args, "silu")
    broken = CountingKernel(factor=2.0)
    monkeypatch.setenv("MOMCOMPRESS_KERNELS", "off")
    torch.testing.assert_close(k.run_checked(broken, "k", "decode", 3, *args, "silu"), want)
    assert broken.calls == 0
    monkeypatch.setenv("MOMCOMPRESS_KERNELS", "trust")
    torch.testing.assert_close(k.run_checked(broken, "k", "decode", 3, *args, "silu"), 2 * want)  # unverified, as asked
    assert broken.calls == 1 and not k._verdicts
    monkeypatch.setenv("MOMCOMPRESS_KERNELS", "fast")
    with pytest.raises(k.KernelModeError, match="check, trust, off"):
        k.run_checked(broken, "k", "decode", 3, *args, "silu")


# -- the TensorRT AOT plugin's fused kernel -------------------------------------------------------------
AOT_CASES = [(1, 64, 1, 40, 4, 1), (3, 64, 2, 24, 5, 2), (2, 200, 4, 12, 6, 3), (5, 64, 16, 6, 4, 4), (2, 32, 12, 3, 3, 2)]


@pytest.mark.parametrize("case", AOT_CASES, ids=lambda c: "T{}-d{}-b{}-R{}-E{}-k{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aot_kernel_matches_reference(case, dtype):
    """plugins/triton_aot.py at b = 1, 2, 4, 16 and 12, ragged experts, k = 1..4, dead tokens: accumulate + routed."""
    kernels()
    from momcompress.plugins import triton_aot

    T, d, b, R, E, k = case
    args = make_problem(T, d, b, R, E, k, dtype, DEVICE, dead_tokens=True)
    acc = torch.randn(T, d, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    out = triton_aot.mom_experts(*args, acc, "silu")
    assert out.shape == acc.shape and out.dtype == dtype
    want = acc.float().cpu() + reference(args, "silu")
    err = (out.float().cpu() - want).abs().max().item()
    assert err <= RTOL[dtype] * want.abs().max().item(), err
    assert torch.equal(out[0], acc[0])  # token 0's experts use no block: accumulate passes through


def test_aot_shape_guard():
    kernels()
    from momcompress.plugins import triton_aot

    assert triton_aot.check_shapes((8, 1, 64), (8, 1, 64), (8, 1, 64), 64) == (8, 1, 64)
    with pytest.raises(ValueError, match="one shape"):
        triton_aot.check_shapes((8, 4, 64), (8, 4, 64), (64, 32), 64)
    with pytest.raises(ValueError, match="hidden size 32"):
        triton_aot.check_shapes((8, 4, 64), (8, 4, 64), (8, 4, 64), 32)
