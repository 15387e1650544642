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


def _stage_function(name: str, target: str, summary: str):
    """A plain function `name` that imports `target` ("module:function") when called and calls it, so that
    `import momcompress` stays light (no torch)."""
    module_name, func_name = target.split(":")

    def stage(*args, **kwargs):
        return getattr(_importlib.import_module(module_name), func_name)(*args, **kwargs)

    stage.__name__ = stage.__qualname__ = name
    stage.__doc__ = f"{summary}; see :func:`{module_name}.{func_name}`."
    return stage


learn = _stage_function("learn", "momcompress.learn.trainer:learn", "Learn masks and routers")
freeze = _stage_function("freeze", "momcompress.freeze.freezer:freeze", "Freeze a learn run into a loadable model folder")
export = _stage_function("export", "momcompress.export.exporter:export", "Export a frozen (or dense) model to ONNX")
validate = _stage_function("validate", "momcompress.validate.validator:validate",
                           "Validate a frozen model against its dense original")
baseline = _stage_function("baseline", "momcompress.baselines.base:baseline",
                           "Build a comparison model at the same activation ratio")
load = _stage_function("load", "momcompress.runtime.load:load", "Load a frozen model folder as a transformers causal LM")

STAGES = ("learn", "freeze", "export", "validate", "baseline")

__all__ = ["MomcompressError", *STAGES, "load", "__version__"]
