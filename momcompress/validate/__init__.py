"""`validate`: accuracy, cost and speed of a compressed model against its dense original (DESIGN.md, "Validation").

``momcompress.validate(...)`` calls :func:`momcompress.validate.validator.validate`; the modules are
tasks (zero-shot scoring), cost (per-token parameters and FLOPs), speed (latency), plots and report.
"""

from momcompress._stage import make_callable

make_callable(__name__, "momcompress.validate.validator:validate")
