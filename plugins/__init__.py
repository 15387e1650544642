"""TensorRT plugin for the MoMExperts op (importable as momcompress.plugins); built in the export stage."""
