"""Calibration text: loading, tokenising, packing and splitting (importable as momcompress.calibration)."""
