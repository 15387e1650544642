"""export: ONNX (and TensorRT) export of frozen MoM models, importable as momcompress.export;
``momcompress.export(...)`` (in momcompress/__init__.py) calls :func:`momcompress.export.exporter.export`.

Modules: op (the MoMExperts node, its schema and function bodies), causal_lm (the flat KV-cache
interface in PyTorch and onnxruntime), exporter (orchestration), checks (the checklist against
PyTorch), trt (the TensorRT engine build; tensorrt is imported only there, inside functions).
"""
