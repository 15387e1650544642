"""momcompress: learn a mixture of masks over the FFN neurons of a dense LLM, freeze it into
shared / routed / pruned expert groups, and deploy it through ONNX and TensorRT.

Stages are plain functions named like their CLI commands: ``momcompress.learn(...)``.
"""

__version__ = "0.1.0"

from momcompress.errors import MomcompressError  # noqa: E402


from momcompress import freeze, learn, validate  # noqa: E402  callable stage packages (see _stage.py)


def load(*args, **kwargs):
    """Load a frozen model folder as a transformers causal LM; see :func:`momcompress.runtime.load.load`."""
    from momcompress.runtime.load import load as _load

    return _load(*args, **kwargs)


__all__ = ["MomcompressError", "learn", "freeze", "validate", "load", "__version__"]
