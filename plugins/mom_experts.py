"""TensorRT plugin `momcompress::MoMExperts` (DESIGN.md, "Export"), with TensorRT's `tensorrt.plugin` API.

The ONNX exporter (momcompress/export/op.py) writes one MoMExperts node per layer with attributes
top_k, activation, plugin_namespace="momcompress", plugin_version="1"; once the model-local functions
are stripped, TensorRT's ONNX parser maps each node to the plugin registered here (TensorRT >= 10.9):
- `@trtp.register`: the op definition and its shape description (output = accumulate's shape and dtype);
- `@trtp.impl`: the JIT implementation, which launches our Triton kernels through torch
  (torch.ops.momcompress.routed_experts) on TensorRT's stream; needs Python at run time;
- `@trtp.aot_impl`: the ahead-of-time implementation: the fused kernel of plugins/triton_aot.py compiled
  by Triton to PTX, which TensorRT embeds in the engine, so deployment needs no Python.

    from momcompress.plugins.mom_experts import register
    register("aot")   # before parsing the ONNX file / building the engine

Importing this module needs neither tensorrt nor triton; `register` imports them.
"""

from __future__ import annotations

PLUGIN_ID = "momcompress::MoMExperts"
IMPLEMENTATIONS = ("aot", "jit", "both")


def _aot_signature(dtype_name: str) -> dict:
    """Triton signature of triton_aot.mom_experts_kernel for weights of one dtype (the pointers TensorRT passes)."""
    t = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}[dtype_name]
    return {
        "x_ptr": t, "top_w_ptr": "*fp32", "top_i_ptr": "*i64", "gate_ptr": t, "up_ptr": t, "down_ptr": t,
        "scale_ptr": "*fp32", "acc_ptr": t, "out_ptr": t, "R": "i32", "d": "i32",
        "K": "constexpr", "B": "constexpr", "ACT": "constexpr", "BLOCK_D": "constexpr", "BLOCK_K": "constexpr", "BLOCK_N": "constexpr",
    }


_registered: dict[str, str] = {}


def register(implementation: str = "aot") -> str:
    """Register the MoMExperts plugin with TensorRT (once per process) and return its id.

    Args:
        implementation: "aot" (embedded PTX; engines run without Python), "jit" (Python + torch at run
            time, our full Triton kernels) or "both" (TensorRT picks).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if _registered:  # TensorRT's plugin registry is per process: one registration
        if _registered["implementation"] != implementation:
            raise RuntimeError(f"the plugin is already registered with the {_registered['implementation']!r} implementation in this process")
        return PLUGIN_ID
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def mom_experts_desc(
        x: trtp.TensorDesc, top_w: trtp.TensorDesc, top_i: trtp.TensorDesc, routed_gate: trtp.TensorDesc,
        routed_up: trtp.TensorDesc, routed_down: trtp.TensorDesc, expert_block_scale: trtp.TensorDesc,
        accumulate: trtp.TensorDesc, top_k: int, activation: str,
    ) -> trtp.TensorDesc:
        return accumulate.like()  # (T, d) in the model dtype

    @trtp.autotune(PLUGIN_ID)
    def mom_experts_autotune(
        x: trtp.TensorDesc, top_w: trtp.TensorDesc, top_i: trtp.TensorDesc, routed_gate: trtp.TensorDesc,
        routed_up: trtp.TensorDesc, routed_down: trtp.TensorDesc, expert_block_scale: trtp.TensorDesc,
        accumulate: trtp.TensorDesc, top_k: int, activation: str, outputs: tuple[trtp.TensorDesc],
    ) -> list[trtp.AutoTuneCombination]:
        # x, weights, accumulate and out share the model dtype; top_w and the scales are fp32, top_i int64.
        t = "FP32|FP16|BF16"
        return [trtp.AutoTuneCombination(f"{t}, FP32, INT64, {t}, {t}, {t}, FP32, {t}, {t}", "LINEAR")]

    if implementation in ("jit", "both"):

        @trtp.impl(PLUGIN_ID)
        def mom_experts_impl(
            x: trtp.Tensor, top_w: trtp.Tensor, top_i: trtp.Tensor, routed_gate: trtp.Tensor, routed_up: trtp.Tensor,
            routed_down: trtp.Tensor, expert_block_scale: trtp.Tensor, accumulate: trtp.Tensor, top_k: int, activation: str,
            outputs: tuple[trtp.Tensor], stream: int,
        ) -> None:
            import torch

            from momcompress.kernels import routed_experts

            t = [torch.as_tensor(a, device="cuda") for a in (x, top_w, top_i, routed_gate, routed_up, routed_down, expert_block_scale, accumulate)]
            out = torch.as_tensor(outputs[0], device="cuda")
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                out.copy_(t[7] + routed_experts(*t[:7], activation))

    if implementation in ("aot", "both"):

        @trtp.aot_impl(PLUGIN_ID)
        def mom_experts_aot(
            x: trtp.TensorDesc, top_w: trtp.TensorDesc, top_i: trtp.TensorDesc, routed_gate: trtp.TensorDesc,
            routed_up: trtp.TensorDesc, routed_down: trtp.TensorDesc, expert_block_scale: trtp.TensorDesc,
            accumulate: trtp.TensorDesc, top_k: int, activation: str, outputs: tuple[trtp.TensorDesc], tactic: int,
        ):
            import triton

            from momcompress.plugins import triton_aot

            # Weights are constants: static shapes. Any block size runs; the guard rejects other layouts.
            R, b, d = triton_aot.check_shapes(routed_gate.shape_expr, routed_up.shape_expr, routed_down.shape_expr)
            if activation not in triton_aot.ACTIVATION_CODES:
                raise ValueError(f"activation must be one of {sorted(triton_aot.ACTIVATION_CODES)}, got {activation!r}")
            block_d, block_k, block_n = triton_aot.tiles(d)
            import tensorrt as trt

            dtype = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}[x.dtype]
            src = triton.compiler.ASTSource(
                fn=triton_aot.mom_experts_kernel,
                signature=_aot_signature(dtype),
                constexprs={
                    "K": int(top_k), "B": b, "ACT": triton_aot.ACTIVATION_CODES[activation],
                    "BLOCK_D": block_d, "BLOCK_K": block_k, "BLOCK_N": block_n,
                },
            )
            kernel = triton.compile(src)
            launch = trtp.KernelLaunchParams()
            launch.grid_x = x.shape_expr[0]  # tokens (T is dynamic: a symbolic expression) x output tiles
            launch.grid_y = trtp.cdiv(d, block_d)
            launch.block_x = kernel.metadata.num_warps * 32
            launch.shared_mem = kernel.metadata.shared
            extra = trtp.SymIntExprs(2)  # the scalar arguments after the tensor pointers: R, d
            extra[0] = trtp.SymInt32(R)
            extra[1] = trtp.SymInt32(d)
            return kernel.metadata.name, kernel.asm["ptx"], launch, extra

    _registered["implementation"] = implementation
    return PLUGIN_ID
