"""baselines: the comparison models of `validate` at the same activation ratio as a MoM model
(MoEfication, static structured pruning, TEAL-style activation sparsity); ``momcompress.baseline(...)``
(in momcompress/__init__.py) calls :func:`momcompress.baselines.base.baseline`."""
