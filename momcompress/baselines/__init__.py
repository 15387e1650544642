"""baselines: the comparison models of `validate` at the same activation ratio as a MoM model
(MoEfication, static structured pruning, TEAL-style activation sparsity); ``momcompress.baselines(...)``
calls :func:`momcompress.baselines.base.baseline`."""

from momcompress._stage import make_callable

make_callable(__name__, "momcompress.baselines.base:baseline")
