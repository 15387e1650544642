"""The compiled CPU row kernel of the per-token selector FFN, for the PyTorch runtime.

`csrc/momcompress_cpu_ops.cc` (with `csrc/select_rows.h`, the same row kernel onnxruntime's SelectFFN op
runs) reads, for each token, only the gate_up rows of the channels it keeps and the down rows of the neurons
it keeps, where they lie, on torch's own OpenMP threads. On an Intel Xeon with AMX, where oneDNN's dense
matmuls are fast, it ran the default model's 30 FFN layers at one token in 0.47-0.66x dense's time
(bench_freeze, three runs; the README's "Speed"), where the Numba kernel (cpu_select.py) had been 1.5x.

It needs only a C++ compiler: `momcompress build-ops` builds it (the README's install line runs that), and
the first call that wants it builds it too when a compiler is there (a few seconds, once per machine and
source). The library is cached under `$MOMCOMPRESS_CACHE/cpu-ops/`; `$MOMCOMPRESS_CPU_OPS` overrides (a
library path, or `off`: never use it). Without it the runtime falls back to the Numba kernel or the masked
path, and says once how to get it.

    from momcompress.kernels import cpu_native
    if cpu_native.runs_on(x, gate_up, down) and cpu_native.available():
        y = cpu_native.select_ffn_rows(x, x_threshold, gate_up, down, h_threshold, "silu")
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import torch

from momcompress import native
from momcompress.errors import MomcompressError
from momcompress.kernels.cpu_fused import ACTIVATION_CODES  # the same codes as the C++ Act enum

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE = CSRC / "momcompress_cpu_ops.cc"
SOURCES = (SOURCE, CSRC / "select_rows.h", CSRC / "amx_select.h")
LIBRARY_NAME = "libmomcompress_cpu_ops.so"
CACHE_SUBDIR = "cpu-ops"
ENV_LIBRARY = "MOMCOMPRESS_CPU_OPS"
ABI = 4  # momcompress_cpu_ops_abi() of the library this module calls
# -fopenmp: the kernel's threads come from the OpenMP runtime torch has loaded (same soname, one runtime).
CXXFLAGS = ("-std=c++17", "-O3", "-ffp-contract=fast", "-fPIC", "-shared", "-fvisibility=hidden", "-fopenmp")
BUILD_COMMAND = "momcompress build-ops"
ENV_AMX = "MOMCOMPRESS_AMX"  # `off`: never use the AMX products (AmxLayer)
WEIGHT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class CpuOpsError(MomcompressError):
    """The compiled CPU ops cannot be built, loaded, or called as asked."""


def build(force: bool = False) -> Path:
    """Compile the library (cached; force: again) and return its path.

    Raises:
        native.NativeUnavailableError: no C++ compiler. CpuOpsError: the compiler failed.
    """
    try:
        return native.build(CACHE_SUBDIR, LIBRARY_NAME, SOURCES, [*CXXFLAGS, f"-I{CSRC}"], compile_only=[SOURCE],
                            force=force, describe="momcompress CPU ops for PyTorch")
    except native.NativeUnavailableError:
        raise
    except native.NativeBuildError as exc:
        raise CpuOpsError(f"the momcompress CPU ops: {exc}") from None


def find_library() -> Path | None:
    """The library built from this source ($MOMCOMPRESS_CPU_OPS overrides), or None (not built / `off`)."""
    return native.find_library(CACHE_SUBDIR, LIBRARY_NAME, SOURCES, ENV_LIBRARY, CpuOpsError)


def load(path: Path) -> ctypes.CDLL:
    """Load the library at path and check its entry point; CpuOpsError when it is not ours or of another ABI."""
    try:
        lib = ctypes.CDLL(str(path))
        abi = int(lib.momcompress_cpu_ops_abi())
    except (OSError, AttributeError) as exc:
        raise CpuOpsError(f"{path} is not a momcompress CPU ops library ({exc}): rebuild it with `{BUILD_COMMAND} --force`") from None
    if abi != ABI:
        raise CpuOpsError(f"{path} has entry points of version {abi}, this momcompress calls version {ABI}: "
                          f"rebuild it with `{BUILD_COMMAND} --force`")
    fn = lib.momcompress_select_ffn_rows
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(_Layer), ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.momcompress_cpu_ops_last_error.restype = ctypes.c_char_p
    lib.momcompress_amx_usable.restype = ctypes.c_int
    lib.momcompress_amx_packed_size.restype = ctypes.c_int64
    lib.momcompress_amx_packed_size.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.momcompress_amx_pack.restype = ctypes.c_int
    lib.momcompress_amx_pack.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    amx = lib.momcompress_select_ffn_amx
    amx.restype = ctypes.c_int
    amx.argtypes = [ctypes.POINTER(_AmxLayer), ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    hidden = lib.momcompress_select_hidden
    hidden.restype = ctypes.c_int
    hidden.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                       ctypes.c_int]
    return lib


class _Layer(ctypes.Structure):
    """MomSelectLayer of momcompress_cpu_ops.cc."""

    _fields_ = [("d", ctypes.c_int64), ("n", ctypes.c_int64), ("x_threshold", ctypes.c_void_p),
                ("gate_up", ctypes.c_void_p), ("down", ctypes.c_void_p), ("h_threshold", ctypes.c_void_p),
                ("weight_type", ctypes.c_int32), ("act", ctypes.c_int32)]


class _AmxLayer(ctypes.Structure):
    """MomAmxLayer of momcompress_cpu_ops.cc."""

    _fields_ = [("d", ctypes.c_int64), ("n", ctypes.c_int64), ("x_threshold", ctypes.c_void_p),
                ("gate_up_packed", ctypes.c_void_p), ("down_packed", ctypes.c_void_p), ("h_threshold", ctypes.c_void_p),
                ("act", ctypes.c_int32), ("reserved", ctypes.c_int32)]


_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "lib": the loaded library, or None after a failed attempt; "why": the reason


def library(build_if_missing: bool = True) -> ctypes.CDLL | None:
    """The loaded library, or None when it is off, missing and not buildable here (the reason is logged once).

    The first call finds the library, building it when it is missing and a compiler is there
    (build_if_missing); later calls return the same answer.
    """
    if "lib" in _STATE:  # every call after the first: no lock
        return _STATE["lib"]  # type: ignore[return-value]
    with _LOCK:
        if "lib" in _STATE:
            return _STATE["lib"]  # type: ignore[return-value]
        path, why = None, None
        if os.environ.get(ENV_LIBRARY, "").strip().lower() == "off":
            why = f"{ENV_LIBRARY}=off"
        else:
            try:
                path = find_library()
                if path is None and build_if_missing:
                    log.info("building the momcompress CPU ops (once per machine and source)")
                    path = build()
            except (native.NativeBuildError, CpuOpsError) as exc:
                why = str(exc)
        lib = None
        if path is not None:
            try:
                lib = load(path)
            except CpuOpsError as exc:
                why = str(exc)
        elif why is None:
            why = f"not built: run `{BUILD_COMMAND}`"
        if lib is None:
            log.warning("the compiled CPU kernel of the selector FFN is not available (%s); the Numba kernel or the "
                        "masked path runs instead (same results, slower)", why)
        _STATE["lib"], _STATE["why"] = lib, why
        return lib


def unavailable_reason() -> str | None:
    """Why library() returned None (None when it is loaded or not yet looked for)."""
    return _STATE.get("why")  # type: ignore[return-value]


def reset() -> None:
    """Forget the loaded library (tests; a later call looks again)."""
    with _LOCK:
        _STATE.clear()


def available() -> bool:
    return library() is not None


def amx_usable() -> bool:
    """Whether the AMX products for bf16 tables (AmxLayer) run here: the library is there, the CPU has AMX-TILE,
    AMX-BF16 and AVX512-BF16, Linux grants the tile state, and MOMCOMPRESS_AMX is not `off`."""
    if os.environ.get(ENV_AMX, "").strip().lower() == "off":
        return False
    lib = library()
    return lib is not None and bool(lib.momcompress_amx_usable())


def amx_runs_on(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether AmxLayer can take x with these tables (fp32 x, bf16 tables, CPU, no autograd; see amx_usable())."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and gate_up.device.type == "cpu"
            and gate_up.dtype == torch.bfloat16 and down.dtype == torch.bfloat16
            and not (torch.is_grad_enabled() and x.requires_grad))


def runs_on(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether the kernel can take x (T, d) with these tables: CPU, fp32 x, float32/bfloat16/float16 tables of
    one type, contiguous, no autograd (does not look for the library: see available())."""
    return (
        x.device.type == "cpu" and gate_up.device.type == "cpu" and x.dtype == torch.float32
        and gate_up.dtype in WEIGHT_TYPES and down.dtype == gate_up.dtype
        and gate_up.is_contiguous() and down.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or gate_up.requires_grad))
    )


class RowKernel:
    """One frozen selector layer prepared for the kernel: its tables checked once and their addresses kept
    (they are read in place; an in-place update of the tables is seen, a replaced tensor needs a new RowKernel).

    Args:
        x_threshold: (d,). gate_up: (d, 2F') contiguous, gate and up interleaved. down: (F', d) contiguous, of
        gate_up's dtype (float32, bfloat16 or float16), on CPU. h_threshold: (F',).
        activation: "silu", "gelu_tanh" or "gelu".
    Raises:
        CpuOpsError: the library is not available, or the tables do not fit (the message says which).
    """

    def __init__(self, x_threshold: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, h_threshold: torch.Tensor,
                 activation: str):
        lib = library()
        if lib is None:
            raise CpuOpsError(f"the compiled CPU kernel is not available ({unavailable_reason()})")
        if gate_up.dim() != 2 or down.dim() != 2:
            raise CpuOpsError(f"the selector kernel expects gate_up (d, 2F') and down (F', d); got {tuple(gate_up.shape)} "
                              f"and {tuple(down.shape)}")
        n, d = down.shape
        if gate_up.shape != (d, 2 * n):
            raise CpuOpsError(f"the selector kernel: gate_up must be (d, 2F') = ({d}, {2 * n}) for down ({n}, {d}); got "
                              f"{tuple(gate_up.shape)}")
        if x_threshold.shape != (d,) or h_threshold.shape != (n,):
            raise CpuOpsError(f"the selector kernel: x_threshold must be ({d},) and h_threshold ({n},); got "
                              f"{tuple(x_threshold.shape)} and {tuple(h_threshold.shape)}")
        if (gate_up.device.type != "cpu" or down.dtype != gate_up.dtype or gate_up.dtype not in WEIGHT_TYPES
                or not gate_up.is_contiguous() or not down.is_contiguous()):
            raise CpuOpsError(f"the selector kernel reads CPU tables, contiguous, of one type in "
                              f"{sorted(str(t) for t in WEIGHT_TYPES)}; got gate_up {gate_up.dtype} on {gate_up.device} "
                              f"(contiguous: {gate_up.is_contiguous()}), down {down.dtype} (contiguous: {down.is_contiguous()})")
        if activation not in ACTIVATION_CODES:
            raise CpuOpsError(f"activation must be one of {sorted(ACTIVATION_CODES)}, got {activation!r}")
        self.d, self.n = d, n
        # Keep what the kernel reads alive (thresholds as contiguous fp32: the buffers themselves when they are).
        self.tensors = (x_threshold.detach().to(torch.float32).contiguous(), gate_up.detach(), down.detach(),
                        h_threshold.detach().to(torch.float32).contiguous())
        xt, gu, dn, ht = self.tensors
        self.layer = _Layer(d, n, xt.data_ptr(), gu.data_ptr(), dn.data_ptr(), ht.data_ptr(), WEIGHT_TYPES[gu.dtype],
                            ACTIVATION_CODES[activation])
        self._ref = ctypes.byref(self.layer)
        self._act = ACTIVATION_CODES[activation]
        self._fn = lib.momcompress_select_ffn_rows
        self._lib = lib

    def __call__(self, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """The layer on x (T, d) float32 CPU (no autograd): (T, d) float32."""
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.d or x.device.type != "cpu":
            raise CpuOpsError(f"the selector kernel takes x (T, {self.d}) float32 on CPU; got {tuple(x.shape)} {x.dtype} "
                              f"on {x.device}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise CpuOpsError("the selector kernel has no backward: call it under torch.no_grad() (or use the masked path)")
        x = x.contiguous()
        out = torch.empty(x.shape[0], self.d, dtype=torch.float32)
        self._check(self._fn(self._ref, x.shape[0], x.data_ptr(), out.data_ptr(), threads or torch.get_num_threads()))
        return out

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """__call__ without its checks, for a caller that has made them (FrozenSelectFFN's decided calls): x (T, d)
        float32 on CPU, no autograd."""
        x = x.contiguous()
        out = torch.empty(x.shape[0], self.d, dtype=torch.float32)
        self._check(self._fn(self._ref, x.shape[0], x.data_ptr(), out.data_ptr(), torch.get_num_threads()))
        return out

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise CpuOpsError(f"the selector kernel failed: {self._lib.momcompress_cpu_ops_last_error().decode(errors='replace')}")


    def masked(self, x: torch.Tensor, gate_up: torch.Tensor | None = None, down: torch.Tensor | None = None,
               threads: int | None = None) -> torch.Tensor:
        """The layer on x (T, d) float32 by dense matmuls over the masked input (torch's, for many tokens), with the
        activation and the neuron threshold in one compiled pass between them (fp32 tables: the layer's, or
        gate_up and down given here, e.g. fp32 copies of 16-bit ones): (T, d) float32."""
        xt, gu_table, dn_table, ht = self.tensors
        gu_table = gu_table if gate_up is None else gate_up
        down = dn_table if down is None else down
        if gu_table.shape != (self.d, 2 * self.n) or down.shape != (self.n, self.d):
            raise CpuOpsError(f"the compiled masked path: gate_up must be ({self.d}, {2 * self.n}) and down "
                              f"({self.n}, {self.d}); got {tuple(gu_table.shape)} and {tuple(down.shape)}")
        if gu_table.dtype != torch.float32 or down.dtype != torch.float32 or x.dtype != torch.float32:
            raise CpuOpsError(f"the compiled masked path takes float32 x and tables; got {x.dtype} and {gu_table.dtype}")
        xs = x * (x.abs() > xt)
        gu = (xs @ gu_table).contiguous()
        h = torch.empty(x.shape[0], self.n, dtype=torch.float32)
        self._check(self._lib.momcompress_select_hidden(gu.data_ptr(), x.shape[0], self.n, ht.data_ptr(), self._act,
                                                        h.data_ptr(), threads or torch.get_num_threads()))
        return h @ down


def select_ffn_rows(x: torch.Tensor, x_threshold: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                    h_threshold: torch.Tensor, activation: str, threads: int | None = None) -> torch.Tensor:
    """The selector FFN on x (T, d) float32, reading only each token's kept rows: (T, d) float32 (see RowKernel
    for the tables; a layer called often keeps its RowKernel instead of calling this)."""
    return RowKernel(x_threshold, gate_up, down, h_threshold, activation)(x, threads)


class AmxLayer:
    """One frozen selector layer with bf16 tables, packed once for AMX tile products (csrc/amx_select.h): the layer
    on fp32 x with two dense products over the masked inputs, each fp32 activation split into two bf16 parts (hi,
    and lo = the rest) so that the tables are multiplied as they are with fp32 accumulation and nothing is rounded
    to bf16 (relative difference to fp32 arithmetic on the same tables about 4e-6, see the header). The packed
    copies take the tables' own size (the masked path's fp32 copies, which this replaces, take twice that).

    Args: as RowKernel's, with gate_up (d, 2F') and down (F', d) bfloat16 (any layout: they are copied).
    Raises:
        CpuOpsError: the library or AMX is not usable here, or the tables do not fit.
    """

    def __init__(self, x_threshold: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, h_threshold: torch.Tensor,
                 activation: str):
        lib = library()
        if lib is None:
            raise CpuOpsError(f"the compiled CPU kernel is not available ({unavailable_reason()})")
        if not lib.momcompress_amx_usable():
            raise CpuOpsError("AMX is not usable here (it needs AMX-TILE, AMX-BF16 and AVX512-BF16, e.g. an Intel Xeon "
                              "of the Sapphire Rapids generation or later, and Linux 5.16+): use the masked path")
        if gate_up.dtype != torch.bfloat16 or down.dtype != torch.bfloat16 or gate_up.dim() != 2 or down.dim() != 2:
            raise CpuOpsError(f"the AMX path takes bfloat16 tables gate_up (d, 2F') and down (F', d); got "
                              f"{tuple(gate_up.shape)} {gate_up.dtype} and {tuple(down.shape)} {down.dtype}")
        n, d = down.shape
        if gate_up.shape != (d, 2 * n) or x_threshold.shape != (d,) or h_threshold.shape != (n,):
            raise CpuOpsError(f"the AMX path: gate_up must be ({d}, {2 * n}), x_threshold ({d},), h_threshold ({n},) for "
                              f"down ({n}, {d}); got {tuple(gate_up.shape)}, {tuple(x_threshold.shape)}, "
                              f"{tuple(h_threshold.shape)}")
        if activation not in ACTIVATION_CODES:
            raise CpuOpsError(f"activation must be one of {sorted(ACTIVATION_CODES)}, got {activation!r}")
        self.d, self.n, self._lib = d, n, lib
        packed = []
        for table in (gate_up, down):
            table = table.detach().to("cpu").contiguous()
            k, m = table.shape
            out = torch.empty(int(lib.momcompress_amx_packed_size(k, m)), dtype=torch.bfloat16)
            lib.momcompress_amx_pack(table.data_ptr(), k, m, out.data_ptr(), torch.get_num_threads())
            packed.append(out)
        self.tensors = (x_threshold.detach().to(torch.float32).contiguous(), *packed,
                        h_threshold.detach().to(torch.float32).contiguous())
        xt, gu, dn, ht = self.tensors
        self.layer = _AmxLayer(d, n, xt.data_ptr(), gu.data_ptr(), dn.data_ptr(), ht.data_ptr(), ACTIVATION_CODES[activation], 0)
        self._ref = ctypes.byref(self.layer)
        self._fn = lib.momcompress_select_ffn_amx

    def __call__(self, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """The layer on x (T, d) float32 CPU (no autograd): (T, d) float32."""
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.d or x.device.type != "cpu":
            raise CpuOpsError(f"the AMX path takes x (T, {self.d}) float32 on CPU; got {tuple(x.shape)} {x.dtype} on {x.device}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise CpuOpsError("the AMX path has no backward: call it under torch.no_grad() (or use the masked path)")
        x = x.contiguous()
        out = torch.empty(x.shape[0], self.d, dtype=torch.float32)
        if self._fn(self._ref, x.shape[0], x.data_ptr(), out.data_ptr(), threads or torch.get_num_threads()) != 0:
            raise CpuOpsError(f"the AMX path failed: {self._lib.momcompress_cpu_ops_last_error().decode(errors='replace')}")
        return out
