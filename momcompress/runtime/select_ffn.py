"""The frozen per-token selector FFN: what `freeze` writes for `learn --selector activations` and
`momcompress.load` runs (DESIGN.md, "Per-token selection").

One layer holds, for hidden size d and F' stored neurons (the FFN's neurons minus the pruned ones):
    gate_up      (d, 2F')  W_gate and W_up transposed and interleaved: row j holds, for every stored
                           neuron i, its gate weight (column 2i) and up weight (column 2i + 1) on
                           input channel j: what a token reads when it keeps channel j, and a neuron's
                           gate and up side by side for kernels that work on a range of neurons
    down         (F', d)   W_down transposed: row i is the output column of stored neuron i
    x_threshold  (d,) fp32 channel j is read when |x_j| > x_threshold[j]  (exp(theta_x) / ||column j||;
                           -1 for a channel every calibration token kept: shared; inf: pruned)
    h_threshold  (F',) fp32 neuron i is read when |h_i| > h_threshold[i] (exp(theta_h) / ||W_down[:, i]||;
                           -1 for shared neurons)
gate_up and down are in the model's dtype, or 16-bit in an fp32 model frozen with `--table-dtype` (half the
bytes a token reads; the row kernels multiply in fp32).
For a token x: x_s = x * (|x| > x_threshold); (g, u) = x_s @ gate_up; h = act(g) * u;
y = (h * (|h| > h_threshold)) @ down. The token reads 2 F' kept_x + d kept_h of the dense FFN's 3 F d
parameters, plus the d + F' thresholds (its selector).

Execution paths (`FrozenSelectFFN.path` forces one):
- masked (any device, any token count): the formula above with dense matmuls over masked inputs; it
  computes the zeros too, at the speed of the dense FFN. bf16 tables beside fp32 x on a CPU with AMX-BF16: the
  AMX tile products of kernels/cpu_native.py (AmxLayer) multiply the bf16 tables themselves, each fp32
  activation split into three bf16 parts so that the result is fp32 arithmetic's to rounding (the tables packed
  once, their own size). Other 16-bit cases: fp32 copies of the tables, made at the first masked call and kept,
  because torch's CPU GEMMs have no fp32-activation x 16-bit-weight form and a bf16 GEMM would round x, h and
  the products' sums to bf16;
- native (CPU, fp32 x, fp32/bf16/fp16 tables; a C++ compiler once): kernels/cpu_native.py, the compiled
  row kernel: each token reads only the kept channels' rows of gate_up and the kept neurons' rows of
  down, where they lie, on torch's OpenMP threads;
- fused (CPU, fp32, Numba installed): kernels/cpu_select.py, the same reads compiled by Numba (the
  fallback where the compiled library cannot be built);
- under torch.export / ONNX export: one `momcompress::select_ffn` node (kernels/select_op.py).

`auto` picks, per layer, by measuring in place (the weights' cache state, the layer's own sparsity and the
machine's load are those of real use; a layer whose tokens keep most rows is better off masked):
- more than MAX_TRIAL_TOKENS tokens per call: masked (the union of the tokens' rows is nearly every row);
- otherwise, per token-count bucket (1, 2, 3-4, 5-8, 9-16) and thread count, the layer's first calls
  alternate between the row kernel (native, else fused) and masked, timing each; after TRIALS timed calls
  of each (and one untimed warm-up each), the faster by median is kept for that bucket. Both paths compute
  the same function (to fp32 rounding), so the trial calls' outputs are as good as any.
`MOMCOMPRESS_SELECT_MAX_TOKENS=N` decides by token count alone instead: the row kernel up to N tokens.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from torch import nn

from momcompress.kernels import cpu_native, cpu_select
from momcompress.kernels.reference import ACTIVATIONS, select_ffn_reference

PATHS = ("auto", "masked", "native", "fused")
TRIAL_BUCKETS = (1, 2, 4, 8, 16)  # a call of T tokens falls in the first bucket >= T
MAX_TRIAL_TOKENS = TRIAL_BUCKETS[-1]
TRIALS = 3
ENV_MAX_TOKENS = "MOMCOMPRESS_SELECT_MAX_TOKENS"


def _tracing() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.compiler.is_compiling() or exporting() or torch.onnx.is_in_onnx_export()


class FrozenSelectFFN(nn.Module):
    """A frozen per-token selector FFN (see the module docstring for the tensors and the formula)."""

    def __init__(self, hidden_size: int, width: int, num_neurons: int, activation: str,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        d, n = hidden_size, num_neurons
        self.hidden_size, self.width, self.num_neurons, self.activation = d, width, n, activation
        self.gate_up = nn.Parameter(torch.zeros(d, 2 * n, dtype=dtype, device=device), requires_grad=False)
        self.down = nn.Parameter(torch.zeros(n, d, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer("x_threshold", torch.zeros(d, dtype=torch.float32, device=device))
        self.register_buffer("h_threshold", torch.zeros(n, dtype=torch.float32, device=device))
        self.path = "auto"
        # auto's measurements: (bucket, threads, kernel) -> {"kernel": [s...], "masked": [s...]} while trying,
        # and the path kept once decided (see the module docstring).
        self._trials: dict[tuple[int, int, str], dict[str, list[float]]] = {}
        self._decided: dict[tuple[int, int, str], str] = {}
        self._kernel_for: dict[tuple, str | None] = {}  # row_kernel's answers
        self._native = None  # (the tables' addresses and dtypes, cpu_native.RowKernel) once the native path ran
        self._wide = None  # (the tables' addresses, fp32 gate_up, fp32 down): 16-bit tables widened for masked
        self._amx = None  # (the tables' addresses, cpu_native.AmxLayer): bf16 tables packed for the AMX products
        self._amx_for: dict[tuple, bool] = {}  # amx_layer's answers per kind of call
        self._ready: dict[tuple, tuple] = {}  # kind of call -> (the tables' key, the decided path's function)
        self.track_stats = False
        self.last_ratio: torch.Tensor | None = None  # (T,) fraction of the dense FFN's parameters each token read
        self.last_kept: tuple[torch.Tensor, torch.Tensor] | None = None  # (T,) kept channels, (T,) kept neurons

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, neurons={self.num_neurons} of {self.width}, activation={self.activation}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.hidden_size)  # (T, d)
        if self._ready:  # a kind of call auto has decided: its path without the bookkeeping (decode calls this a lot)
            ready = self._ready.get((xf.shape, torch.get_num_threads(), x.dtype, x.is_cpu,
                                     x.requires_grad and torch.is_grad_enabled()))
            if ready is not None and self.path == "auto" and not self.track_stats:
                gate_up, down = self._parameters["gate_up"], self._parameters["down"]
                if (ready[0] == (gate_up.data_ptr(), gate_up.dtype, down.data_ptr(), self._buffers["x_threshold"].data_ptr(),
                                 self._buffers["h_threshold"].data_ptr())
                        and not (torch.compiler.is_compiling() or torch.jit.is_tracing()) and ENV_MAX_TOKENS not in os.environ):
                    return ready[1](xf).view(lead + (self.hidden_size,))
        if _tracing():
            from momcompress.kernels.select_op import select_ffn

            out = select_ffn(xf, self.x_threshold, self.gate_up, self.down, self.h_threshold, self.activation)
        elif self.track_stats:
            out = self._masked_with_stats(xf)
        else:
            out = self.run_auto(xf) if self.path == "auto" else self.run_path(self.path, xf)
        return out.view(*lead, self.hidden_size)

    def _table_key(self) -> tuple:
        gate_up, down = self._parameters["gate_up"], self._parameters["down"]
        return (gate_up.data_ptr(), gate_up.dtype, down.data_ptr(), self._buffers["x_threshold"].data_ptr(),
                self._buffers["h_threshold"].data_ptr())

    def _remember(self, path: str, x: torch.Tensor) -> None:
        """Keep the decided path for x's kind of call (shape, threads, dtype, device, autograd) for forward's short
        way (which checks the same key inline); a replaced table, a forced path or track_stats send calls the long
        way again."""
        if path == "native":
            run = self.native_kernel().run
        elif path == "masked":
            run = self.masked
        else:
            return
        self._ready[(x.shape, torch.get_num_threads(), x.dtype, x.is_cpu, x.requires_grad and torch.is_grad_enabled())] = (
            self._table_key(), run)

    def run_path(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """The layer on x (T, d) by the named path (see PATHS)."""
        if path == "native":
            return self.native_kernel()(x)
        if path == "fused":
            return cpu_select.select_ffn_rows(x, self.x_threshold, self.gate_up, self.down, self.h_threshold, self.activation)
        if path == "masked":
            return self.masked(x)
        raise ValueError(f"FrozenSelectFFN.path must be one of {PATHS}, got {path!r}")

    def native_kernel(self):
        """The compiled kernel prepared for this layer's tables (kept until a table is replaced)."""
        key = (self.gate_up.data_ptr(), self.down.data_ptr(), self.x_threshold.data_ptr(), self.h_threshold.data_ptr(),
               self.gate_up.dtype, self.down.dtype)
        if self._native is None or self._native[0] != key:
            kernel = cpu_native.RowKernel(self.x_threshold, self.gate_up, self.down, self.h_threshold, self.activation)
            self._native = (key, kernel)
        return self._native[1]

    def row_kernel(self, x: torch.Tensor) -> str | None:
        """The row kernel that can run x (T, d) here: "native" (compiled, built at first use when a compiler is
        there), else "fused" (Numba), else None. Remembered per kind of call (dtypes, devices, autograd)."""
        key = (x.dtype, x.device.type, self.gate_up.dtype, self.gate_up.device.type, self.gate_up.is_contiguous(),
               self.down.is_contiguous(), torch.is_grad_enabled() and x.requires_grad)
        if key not in self._kernel_for:
            kernel = None
            if cpu_native.runs_on(x, self.gate_up, self.down) and cpu_native.available():
                kernel = "native"
            elif cpu_select.runs_on(x, self.gate_up):
                kernel = "fused"
            self._kernel_for[key] = kernel
        return self._kernel_for[key]

    def _auto_key(self, x: torch.Tensor) -> tuple[tuple[int, int, str] | None, str]:
        """(the measurement key of x's call, or None when no measuring is needed; the path when it is decided)."""
        T = x.shape[0]
        kernel = self.row_kernel(x) if T <= MAX_TRIAL_TOKENS or os.environ.get(ENV_MAX_TOKENS) else None
        if kernel is None:
            return None, "masked"
        env = os.environ.get(ENV_MAX_TOKENS, "").strip()
        if env:
            try:
                return None, kernel if T <= int(env) else "masked"
            except ValueError:
                raise ValueError(f"{ENV_MAX_TOKENS} must be a whole number of tokens, got {env!r}") from None
        bucket = next(b for b in TRIAL_BUCKETS if b >= T)
        key = (bucket, torch.get_num_threads(), kernel)
        if key in self._decided:
            return None, self._decided[key]
        return key, kernel

    def _trial_side(self, key: tuple[int, int, str]) -> str:
        """Which side a bucket's next trial call runs: "kernel" or "masked" (alternating, the kernel first)."""
        trials = self._trials.setdefault(key, {"kernel": [], "masked": []})
        return "kernel" if len(trials["kernel"]) <= len(trials["masked"]) else "masked"

    def run_auto(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on x by auto's choice, timing the call while the choice is being measured."""
        key, kernel = self._auto_key(x)
        if key is None:
            if x.shape[0] <= MAX_TRIAL_TOKENS and not os.environ.get(ENV_MAX_TOKENS):  # decode-sized calls: a few kinds
                self._remember(kernel, x)
            return self.run_path(kernel, x)
        side = self._trial_side(key)
        t0 = time.perf_counter()
        out = self.run_path(kernel if side == "kernel" else "masked", x)
        trials = self._trials[key]
        trials[side].append(time.perf_counter() - t0)
        if min(len(v) for v in trials.values()) > TRIALS:  # the first of each was the warm-up
            med = {k: statistics.median(v[1:]) for k, v in trials.items()}
            self._decided[key] = kernel if med["kernel"] < med["masked"] else "masked"
            del self._trials[key]
        return out

    def decisions(self) -> dict[str, str]:
        """auto's decisions so far: {"T<=1 @2 threads": "native", ...}."""
        return {f"T<={b} @{t} threads": path for (b, t, _), path in sorted(self._decided.items())}

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on x (T, d) with dense matmuls over masked inputs (computes the zeros too); on CPU with the
        compiled ops, the activation and neuron threshold between the two matmuls run as one compiled pass."""
        amx = self.amx_layer(x)
        if amx is not None:
            return amx(x)
        gate_up, down = self.tables_for(x)
        if gate_up.dtype == torch.float32 and self.row_kernel(x) == "native":
            return self.native_kernel().masked(x, gate_up, down)
        return select_ffn_reference(x, self.x_threshold, gate_up, down, self.h_threshold, self.activation)

    def amx_layer(self, x: torch.Tensor):
        """The AMX products prepared for this layer's bf16 tables (cpu_native.AmxLayer), when they can run x here;
        else None. Packed at the first call and kept until a table is replaced."""
        key = (x.dtype, x.device.type, self.gate_up.dtype, self.gate_up.device.type, torch.is_grad_enabled() and x.requires_grad)
        usable = self._amx_for.get(key)
        if usable is None:
            usable = self._amx_for[key] = cpu_native.amx_runs_on(x, self.gate_up, self.down) and cpu_native.amx_usable()
        if not usable:
            return None
        tables = (self.gate_up.data_ptr(), self.down.data_ptr(), self.x_threshold.data_ptr(), self.h_threshold.data_ptr())
        if self._amx is None or self._amx[0] != tables:
            self._amx = (tables, cpu_native.AmxLayer(self.x_threshold, self.gate_up, self.down, self.h_threshold,
                                                     self.activation))
        return self._amx[1]

    def tables_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) for dense matmuls with x: the tables, or for fp32 x beside 16-bit tables their fp32
        copies (made once, dropped when a table is replaced)."""
        if x.dtype != torch.float32 or self.gate_up.dtype == torch.float32:
            return self.gate_up, self.down
        key = (self.gate_up.data_ptr(), self.down.data_ptr(), self.gate_up.device)
        if self._wide is None or self._wide[0] != key:
            self._wide = (key, self.gate_up.detach().float(), self.down.detach().float())
        return self._wide[1], self._wide[2]

    def _masked_with_stats(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.tables_for(x)
        keep_x = x.abs() > self.x_threshold  # (T, d)
        gu = ((x * keep_x.to(x.dtype)) @ gate_up).view(x.shape[0], -1, 2)  # (T, F', 2)
        h = ACTIVATIONS[self.activation](gu[..., 0]) * gu[..., 1]
        keep_h = h.abs() > self.h_threshold  # (T, F')
        kx, kh = keep_x.sum(-1).float(), keep_h.sum(-1).float()
        self.last_kept = (kx, kh)
        self.last_ratio = (2.0 * self.num_neurons * kx + self.hidden_size * kh) / (3.0 * self.hidden_size * self.width)
        return (h * keep_h.to(h.dtype)) @ down

    # -- sizes --------------------------------------------------------------------------------------
    def selector_params(self) -> int:
        """What the selector itself reads per token: the d + F' thresholds."""
        return self.hidden_size + self.num_neurons

    def router_params(self) -> int:
        """No router: the selector's thresholds play its part in the cost (validate counts them)."""
        return self.selector_params()


def auto_decisions(model: nn.Module) -> dict[str, dict[str, int]]:
    """What auto chose in the model's selector layers so far: {"T<=1 @2 threads": {"native": 27, "masked": 3}}."""
    out: dict[str, dict[str, int]] = {}
    for layer in select_layers(model):
        for key, path in layer.decisions().items():
            out.setdefault(key, {})
            out[key][path] = out[key].get(path, 0) + 1
    return out


def select_layers(model: nn.Module) -> list[FrozenSelectFFN]:
    """All frozen selector layers of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, FrozenSelectFFN)]
