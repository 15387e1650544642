"""The compiled CPU row kernel of the per-token selector FFN (momcompress/kernels/cpu_native.py) and the
PyTorch runtime's use of it: results against the torch reference, the build and cache, bad input, and the
auto path's in-place measurement."""

from __future__ import annotations

import time

import pytest
import torch

from momcompress import native
from momcompress.kernels import cpu_native
from momcompress.kernels.reference import select_ffn_reference
from momcompress.runtime import select_ffn as runtime
from momcompress.runtime.select_ffn import FrozenSelectFFN


@pytest.fixture(scope="module")
def lib():
    """The library, built into this test session's cache if needed (a compiler is required: g++)."""
    try:
        cpu_native.build()
    except native.NativeUnavailableError as exc:
        pytest.skip(f"no C++ compiler: {exc}")
    cpu_native.reset()
    got = cpu_native.library(build_if_missing=False)
    assert got is not None, cpu_native.unavailable_reason()
    return got


def _layer_tensors(d, n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(d, 2 * n, generator=g) / d**0.5).to(dtype)
    down = (torch.randn(n, d, generator=g) / n**0.5).to(dtype)
    x_thr = torch.rand(d, generator=g) * 0.8
    x_thr[0] = -1.0  # a shared channel
    x_thr[1] = float("inf")  # a pruned one
    h_thr = torch.rand(n, generator=g) * 0.2
    h_thr[:5] = -1.0
    return x_thr, gate_up, down, h_thr


def _frozen_layer(d, n, seed, activation="silu", dtype=torch.float32, width=None):
    """A FrozenSelectFFN holding _layer_tensors(d, n, seed, dtype), and those tensors."""
    tensors = _layer_tensors(d, n, seed, dtype)
    x_thr, gate_up, down, h_thr = tensors
    layer = FrozenSelectFFN(d, width or n, n, activation, dtype=dtype)
    layer.gate_up.data.copy_(gate_up)
    layer.down.data.copy_(down)
    layer.x_threshold.copy_(x_thr)
    layer.h_threshold.copy_(h_thr)
    return layer, tensors


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("tokens", [0, 1, 2, 3, 5, 8, 17, 70])
def test_kernel_equals_the_reference(lib, activation, tokens):
    """One token (the per-token streams) and many (rows read once for the tokens that keep them, more tokens
    than one pass of 64 at 70), odd sizes (n not a multiple of 16, d not of 16)."""
    d, n = 40, 203
    x_thr, gate_up, down, h_thr = _layer_tensors(d, n, tokens)
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(100 + tokens))
    x[:, 2] = 0.0  # a channel no token keeps
    want = select_ffn_reference(x, x_thr, gate_up, down, h_thr, activation)
    got = cpu_native.select_ffn_rows(x, x_thr, gate_up, down, h_thr, activation)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for threads in (1, 3):  # the split into tasks does not change the result beyond rounding
        torch.testing.assert_close(cpu_native.select_ffn_rows(x, x_thr, gate_up, down, h_thr, activation, threads=threads),
                                   want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 6])
def test_16_bit_tables(lib, dtype, tokens):
    """16-bit tables are read as they are and multiplied in fp32: the reference on the same (rounded) weights."""
    d, n = 64, 96
    x_thr, gate_up, down, h_thr = _layer_tensors(d, n, 7, dtype)
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(3))
    want = select_ffn_reference(x, x_thr, gate_up.float(), down.float(), h_thr, "silu")
    got = cpu_native.select_ffn_rows(x, x_thr, gate_up, down, h_thr, "silu")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bad_input_is_refused_clearly(lib):
    d, n = 16, 32
    x_thr, gate_up, down, h_thr = _layer_tensors(d, n, 0)
    x = torch.randn(2, d)
    with pytest.raises(cpu_native.CpuOpsError, match=r"gate_up must be \(d, 2F'\)"):
        cpu_native.select_ffn_rows(x, x_thr, gate_up[:, :-2], down, h_thr, "silu")
    with pytest.raises(cpu_native.CpuOpsError, match="h_threshold"):
        cpu_native.select_ffn_rows(x, x_thr, gate_up, down, h_thr[:-1], "silu")
    with pytest.raises(cpu_native.CpuOpsError, match="of one type"):
        cpu_native.select_ffn_rows(x, x_thr, gate_up, down.double(), h_thr, "silu")
    with pytest.raises(cpu_native.CpuOpsError, match="contiguous"):
        cpu_native.select_ffn_rows(x, x_thr, gate_up.t().contiguous().t(), down, h_thr, "silu")
    with pytest.raises(cpu_native.CpuOpsError, match="activation must be one of"):
        cpu_native.select_ffn_rows(x, x_thr, gate_up, down, h_thr, "relu")
    with pytest.raises(cpu_native.CpuOpsError, match=r"takes x \(T, 16\) float32"):
        cpu_native.select_ffn_rows(x.double(), x_thr, gate_up, down, h_thr, "silu")
    with pytest.raises(cpu_native.CpuOpsError, match=r"takes x \(T, 16\)"):
        cpu_native.select_ffn_rows(torch.randn(2, d + 1), x_thr, gate_up, down, h_thr, "silu")
    with pytest.raises(cpu_native.CpuOpsError, match="no backward"):
        cpu_native.select_ffn_rows(x.requires_grad_(), x_thr, gate_up, down, h_thr, "silu")


def test_build_is_cached_and_found_by_source(lib, tmp_path, monkeypatch):
    path = cpu_native.build()
    mtime = path.stat().st_mtime_ns
    assert cpu_native.build() == path and path.stat().st_mtime_ns == mtime  # cached
    assert cpu_native.find_library() == path
    assert path.parent.name.startswith(native.sources_hash(cpu_native.SOURCES))
    monkeypatch.setenv(cpu_native.ENV_LIBRARY, str(tmp_path / "missing.so"))
    with pytest.raises(cpu_native.CpuOpsError, match="is not a file"):
        cpu_native.find_library()
    not_ours = tmp_path / "libnot_ours.so"
    not_ours.write_bytes(b"not a library")
    with pytest.raises(cpu_native.CpuOpsError, match="is not a momcompress CPU ops library.*build-ops --force"):
        cpu_native.load(not_ours)


def test_missing_library_falls_back_with_one_message(monkeypatch, caplog, tmp_path):
    """No compiler and no cached library: auto runs the other paths, the reason is logged once, and forcing the
    native path says how to get it."""
    monkeypatch.setenv("MOMCOMPRESS_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    cpu_native.reset()
    try:
        layer = FrozenSelectFFN(16, 32, 32, "silu")
        torch.nn.init.normal_(layer.gate_up)
        torch.nn.init.normal_(layer.down)
        x = torch.randn(1, 16)
        with caplog.at_level("WARNING"), torch.no_grad():
            assert layer.row_kernel(x) in ("fused", None)
            layer(x)
            layer(x)
        assert sum("not available" in r.message for r in caplog.records) == 1
        assert "no C++ compiler" in cpu_native.unavailable_reason()
        layer.path = "native"
        with pytest.raises(cpu_native.CpuOpsError, match="no C\\+\\+ compiler"), torch.no_grad():
            layer(x)
        monkeypatch.delenv("CXX")
        monkeypatch.setenv(cpu_native.ENV_LIBRARY, "off")
        cpu_native.reset()
        assert cpu_native.library() is None and "MOMCOMPRESS_CPU_OPS=off" in cpu_native.unavailable_reason()
    finally:
        cpu_native.reset()


def test_layer_runs_the_kernel_and_follows_replaced_tables(lib):
    layer, _ = _frozen_layer(24, 40, 5, width=48)
    x = torch.randn(3, 24)
    layer.path = "native"
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.masked(x), rtol=1e-4, atol=1e-5)
        layer.down.data = layer.down.data * 2  # a new tensor: the prepared kernel must not read the old one
        torch.testing.assert_close(layer(x), layer.masked(x), rtol=1e-4, atol=1e-5)


def test_auto_measures_in_place_and_keeps_the_faster(lib, monkeypatch):
    """auto alternates the row kernel and masked on a bucket's first calls (one warm-up each, then TRIALS timed),
    keeps the faster per bucket and thread count, and never tries the kernel above MAX_TRIAL_TOKENS tokens;
    MOMCOMPRESS_SELECT_MAX_TOKENS decides by token count instead."""
    monkeypatch.delenv(runtime.ENV_MAX_TOKENS, raising=False)
    layer = FrozenSelectFFN(16, 32, 32, "silu")
    torch.nn.init.normal_(layer.gate_up)
    torch.nn.init.normal_(layer.down)
    calls = []
    real = layer.run_path

    def spy(path, x, delay={"native": 0.0, "masked": 0.02}):
        calls.append(path)
        time.sleep(delay.get(path, 0.0))
        return real(path, x)

    monkeypatch.setattr(layer, "run_path", spy)
    with torch.no_grad():
        for _ in range(2 * (runtime.TRIALS + 1)):
            layer(torch.randn(1, 16))
        assert calls == ["native", "masked"] * (runtime.TRIALS + 1)
        assert layer.decisions() == {f"T<=1 @{torch.get_num_threads()} threads": "native"}
        calls.clear()
        layer(torch.randn(1, 16))
        assert calls == ["native"]
        calls.clear()
        layer(torch.randn(runtime.MAX_TRIAL_TOKENS + 1, 16))
        assert calls == ["masked"]  # many tokens: masked, nothing measured
        # a bucket where the kernel is the slower one
        slow = {"native": 0.02, "masked": 0.0}
        monkeypatch.setattr(layer, "run_path", lambda path, x: spy(path, x, slow))
        for _ in range(2 * (runtime.TRIALS + 1)):
            layer(torch.randn(3, 16))
        assert layer.decisions()[f"T<=4 @{torch.get_num_threads()} threads"] == "masked"
        calls.clear()
        monkeypatch.setenv(runtime.ENV_MAX_TOKENS, "20")
        layer(torch.randn(3, 16))
        layer(torch.randn(17, 16))
        assert calls == ["native", "native"]
        monkeypatch.setenv(runtime.ENV_MAX_TOKENS, "many")
        with pytest.raises(ValueError, match="whole number"):
            layer(torch.randn(3, 16))
    out = runtime.auto_decisions(torch.nn.Sequential(layer))
    assert out[f"T<=1 @{torch.get_num_threads()} threads"] == {"native": 1}


def test_kernel_shares_torchs_openmp_runtime(lib):
    """The kernel's threads are torch's: torch.set_num_threads reaches the library's OpenMP runtime (a second
    runtime, as Numba's omp layer brings, would keep its own count and its own spinning threads)."""
    before = torch.get_num_threads()
    try:
        for n in (3, 1):
            torch.set_num_threads(n)
            assert lib.momcompress_cpu_ops_omp_max_threads() == n
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
def test_masked_path_with_the_compiled_middle_equals_the_reference(lib, activation):
    """Many tokens: torch's matmuls around the compiled activation-and-threshold pass; the reference's result."""
    d, n = 40, 203
    layer, (x_thr, gate_up, down, h_thr) = _frozen_layer(d, n, 11, activation)
    x = torch.randn(300, d, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert layer.row_kernel(x) == "native"
        got = layer.masked(x)
    torch.testing.assert_close(got, select_ffn_reference(x, x_thr, gate_up, down, h_thr, activation), rtol=1e-4, atol=1e-5)
    with torch.enable_grad():  # autograd: the torch reference (no backward through the compiled pass)
        xg = x[:3].clone().requires_grad_()
        layer.masked(xg).sum().backward()
    assert xg.grad is not None


# -- the AMX products for bf16 tables (csrc/amx_select.h) ------------------------------------------------------------

@pytest.fixture()
def amx(lib):
    if not lib.momcompress_amx_usable():
        pytest.skip("this CPU has no AMX-BF16 (or the OS does not grant the tile state): the AMX path cannot run here")
    return lib


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("d,n,tokens", [(40, 203, 1), (40, 203, 33), (64, 96, 7), (576, 1536, 70), (100, 77, 300)])
def test_amx_layer_equals_fp32_arithmetic_on_the_bf16_tables(amx, activation, d, n, tokens):
    """Sizes that are not multiples of the 32-wide blocks (padding), token counts inside one block and over
    several; against the reference in float64 on the same bf16 tables: the split activations keep fp32-like
    accuracy (a single bf16 rounding of x and h would be about 1e-3 off)."""
    x_thr, gate_up, down, h_thr = _layer_tensors(d, n, tokens, torch.bfloat16)
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(5 + tokens))
    x[:, 3] = 0.0
    layer = cpu_native.AmxLayer(x_thr, gate_up, down, h_thr, activation)
    got = layer(x)
    exact = select_ffn_reference(x.double(), x_thr.double(), gate_up.double(), down.double(), h_thr.double(), activation)
    fp32 = select_ffn_reference(x, x_thr, gate_up.float(), down.float(), h_thr, activation)
    err = ((got.double() - exact).norm() / exact.norm()).item()
    assert err < 2e-5, err
    torch.testing.assert_close(got, fp32, rtol=1e-4, atol=1e-4)
    for threads in (1, 3):
        torch.testing.assert_close(layer(x, threads=threads), got, rtol=1e-5, atol=1e-6)


def test_amx_layer_refuses_what_it_cannot_run(amx):
    x_thr, gate_up, down, h_thr = _layer_tensors(32, 48, 0, torch.bfloat16)
    with pytest.raises(cpu_native.CpuOpsError, match="bfloat16 tables"):
        cpu_native.AmxLayer(x_thr, gate_up.float(), down.float(), h_thr, "silu")
    with pytest.raises(cpu_native.CpuOpsError, match="gate_up must be"):
        cpu_native.AmxLayer(x_thr, gate_up[:, :-2], down, h_thr, "silu")
    layer = cpu_native.AmxLayer(x_thr, gate_up, down, h_thr, "silu")
    with pytest.raises(cpu_native.CpuOpsError, match="float32"):
        layer(torch.randn(2, 32, dtype=torch.float64))
    with pytest.raises(cpu_native.CpuOpsError, match="no backward"):
        layer(torch.randn(2, 32, requires_grad=True))


def _bf16_layer(d, n, seed):
    return _frozen_layer(d, n, seed, dtype=torch.bfloat16)


def test_masked_path_of_bf16_tables_runs_amx_where_it_can(lib, monkeypatch):
    """fp32 x beside bf16 tables: the masked path multiplies the packed bf16 tables by AMX where the CPU has it (no
    fp32 copies made), else fp32 copies; MOMCOMPRESS_AMX=off forces the copies. Same results either way."""
    layer, (x_thr, gate_up, down, h_thr) = _bf16_layer(48, 80, 3)
    x = torch.randn(40, 48, generator=torch.Generator().manual_seed(1))
    want = select_ffn_reference(x, x_thr, gate_up.float(), down.float(), h_thr, "silu")
    with torch.no_grad():
        got = layer.masked(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if lib.momcompress_amx_usable():
        assert layer._amx is not None and layer._wide is None
    else:
        assert layer._amx is None and layer._wide is not None
    monkeypatch.setenv(cpu_native.ENV_AMX, "off")
    assert not cpu_native.amx_usable()
    other, _ = _bf16_layer(48, 80, 3)
    with torch.no_grad():
        torch.testing.assert_close(other.masked(x), want, rtol=1e-4, atol=1e-4)
    assert other._amx is None and other._wide is not None


def test_amx_path_follows_replaced_tables(amx):
    layer, _ = _bf16_layer(32, 64, 4)
    x = torch.randn(20, 32)
    with torch.no_grad():
        first = layer.masked(x)
        layer.down.data = layer.down.data * 2  # a new tensor: the packed copy must be made again
        torch.testing.assert_close(layer.masked(x), first * 2, rtol=1e-4, atol=1e-4)


def test_decided_calls_take_the_short_way_and_notice_changes(lib, monkeypatch):
    """Once auto has decided a kind of call, forward runs the decided path directly (no trial bookkeeping); a
    replaced table, a forced path or track_stats send it the long way again, with the right result."""
    monkeypatch.delenv(runtime.ENV_MAX_TOKENS, raising=False)
    layer, (x_thr, gate_up, down, h_thr) = _frozen_layer(24, 40, 9)
    x = torch.randn(1, 24)
    with torch.no_grad():
        for _ in range(2 * (runtime.TRIALS + 1) + 1):
            layer(x)
        assert len(layer._ready) == 1
        layer(torch.randn(runtime.MAX_TRIAL_TOKENS + 1, 24))  # long calls are not remembered (one entry per length)
        assert len(layer._ready) == 1
        decided = layer.decisions()[f"T<=1 @{torch.get_num_threads()} threads"]
        monkeypatch.setattr(layer, "run_auto", lambda x: pytest.fail("the decided call went the long way"))
        torch.testing.assert_close(layer(x), layer.run_path("masked", x), rtol=1e-4, atol=1e-5)
        monkeypatch.undo()
        layer.down.data = layer.down.data * 2  # a new tensor: the remembered kernel must not read the old one
        torch.testing.assert_close(layer(x), select_ffn_reference(x, x_thr, gate_up, down * 2, h_thr, "silu"),
                                   rtol=1e-4, atol=1e-5)
        layer.track_stats = True
        layer(x)
        assert layer.last_ratio is not None  # the stats path ran
        layer.track_stats = False
        layer.path = "masked"
        seen = []
        real = layer.run_path
        monkeypatch.setattr(layer, "run_path", lambda p, x: seen.append(p) or real(p, x))
        layer(x)
        assert seen == ["masked"]
    assert decided in ("native", "masked")
