"""momcompress: learn a mixture of masks over the FFN neurons of a dense LLM, freeze it into
shared / routed / pruned expert groups, and deploy it through ONNX and TensorRT.

Stages are plain functions named like their CLI commands::

    momcompress.learn(model, run_dir, config)        # momcompress/learn/trainer.py
    momcompress.freeze(run_dir, frozen_dir)          # momcompress/freeze/freezer.py
    momcompress.export(frozen_dir, onnx_dir)         # export/exporter.py (importable as momcompress.export)
    momcompress.validate(frozen_dir, dense=...)      # momcompress/validate/validator.py
    momcompress.baseline("teal", model, out, config) # momcompress/baselines/base.py
    momcompress.load(frozen_dir)                     # momcompress/runtime/load.py

Each stage's code keeps its own package of the same name. The packages are imported here before the
functions are bound, so the import system never rebinds ``momcompress.learn`` to the package: every
``from momcompress.learn.trainer import X`` and ``importlib.import_module("momcompress.learn.trainer")``
works, and ``momcompress.learn`` stays the function. The one form that cannot work is reaching a module
through the function's name (``momcompress.learn.trainer`` as an attribute, ``import
momcompress.learn.trainer as t``): import from the module instead.
"""

__version__ = "0.1.0"

from momcompress.errors import MomcompressError  # noqa: E402

import importlib as _importlib  # noqa: E402

# The stage packages (their __init__ files import nothing heavy), imported before the functions below
# take their names.
for _package in ("baselines", "export", "freeze", "learn", "validate"):
    _importlib.import_module(f"{__name__}.{_package}")
del _package


def learn(*args, **kwargs):
    """Learn masks and routers; see :func:`momcompress.learn.trainer.learn`."""
    from momcompress.learn.trainer import learn as run

    return run(*args, **kwargs)


def freeze(*args, **kwargs):
    """Freeze a learn run into a loadable model folder; see :func:`momcompress.freeze.freezer.freeze`."""
    from momcompress.freeze.freezer import freeze as run

    return run(*args, **kwargs)


def export(*args, **kwargs):
    """Export a frozen (or dense) model to ONNX; see :func:`momcompress.export.exporter.export`."""
    from momcompress.export.exporter import export as run

    return run(*args, **kwargs)


def validate(*args, **kwargs):
    """Validate a frozen model against its dense original; see :func:`momcompress.validate.validator.validate`."""
    from momcompress.validate.validator import validate as run

    return run(*args, **kwargs)


def baseline(*args, **kwargs):
    """Build a comparison model at the same ratio; see :func:`momcompress.baselines.base.baseline`."""
    from momcompress.baselines.base import baseline as run

    return run(*args, **kwargs)


def load(*args, **kwargs):
    """Load a frozen model folder as a transformers causal LM; see :func:`momcompress.runtime.load.load`."""
    from momcompress.runtime.load import load as run

    return run(*args, **kwargs)


STAGES = ("learn", "freeze", "export", "validate", "baseline")

__all__ = ["MomcompressError", *STAGES, "load", "__version__"]
