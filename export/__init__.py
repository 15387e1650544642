"""ONNX and TensorRT export of frozen MoM models (importable as momcompress.export); built in the export stage."""
