"""export: ONNX (and TensorRT) export of frozen MoM models, importable as momcompress.export;
``momcompress.export(...)`` (in momcompress/__init__.py) calls :func:`momcompress.export.exporter.export`.

Modules: op (the MoMExperts and SelectedRowsFFN nodes, their schemas and function bodies), causal_lm
(the flat KV-cache interface in PyTorch and onnxruntime), exporter (orchestration), checks (the
checklist against PyTorch), ort_ops (build, find and register the compiled onnxruntime kernels of
csrc/), trt (the TensorRT engine build and the TensorRT-RTX check; tensorrt is imported only there,
inside functions).
"""
