"""baselines: the comparison models of `validate` at the same activation ratio as a MoM model
(MoEfication, static structured pruning, TEAL and WINA activation sparsity); ``momcompress.baseline(...)``
(in momcompress/__init__.py) calls :func:`momcompress.baselines.base.baseline`."""

from momcompress.registry import register_folder_loader

# teal and wina folders keep dense FFN weights plus thresholds: momcompress.load hands them to load_teal.
register_folder_loader("teal", "momcompress.baselines.load:load_teal")
register_folder_loader("wina", "momcompress.baselines.load:load_teal")
