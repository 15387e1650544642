"""TensorRT plugin for the MoMExperts op (importable as momcompress.plugins).

`momcompress.plugins.mom_experts.register()` registers `momcompress::MoMExperts` with TensorRT's
`tensorrt.plugin` API (JIT: our Triton kernels via torch; AOT: a fused Triton kernel compiled to PTX
and embedded in the engine). Importing this package needs neither tensorrt nor triton
(`pip install 'momcompress[trt]'` adds TensorRT).
"""

from momcompress.plugins.mom_experts import PLUGIN_ID, register

__all__ = ["PLUGIN_ID", "register"]
