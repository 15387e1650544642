"""export: ONNX (and TensorRT) export of frozen MoM models, importable as momcompress.export;
``momcompress.export(...)`` calls :func:`momcompress.export.exporter.export`.

Modules: op (the MoMExperts node, its schema and function bodies), causal_lm (the flat KV-cache
interface in PyTorch and onnxruntime), exporter (orchestration), checks (the checklist against
PyTorch), trt (the TensorRT engine build; tensorrt is imported only there, inside functions).
"""

from momcompress._stage import make_callable

make_callable(__name__, "momcompress.export.exporter:export")
