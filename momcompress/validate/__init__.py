"""`validate`: accuracy, cost and speed of a compressed model against its dense original (DESIGN.md, "Validation").

``momcompress.validate(...)`` (in momcompress/__init__.py) calls :func:`momcompress.validate.validator.validate`; the modules are
tasks (zero-shot scoring), cost (per-token parameters and FLOPs), speed (latency), plots and report.
"""
