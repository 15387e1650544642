"""momcompress: learn a mixture of masks over the FFN neurons of a dense LLM, freeze it into
shared / routed / pruned expert groups, and deploy it through ONNX and TensorRT.

Stages are plain functions named like their CLI commands: ``momcompress.learn(...)``.
"""

__version__ = "0.1.0"

from momcompress.errors import MomcompressError  # noqa: E402


def learn(*args, **kwargs):
    """Learn masks and a router; see :func:`momcompress.learn.trainer.learn`."""
    from momcompress.learn.trainer import learn as _learn

    return _learn(*args, **kwargs)


__all__ = ["MomcompressError", "learn", "__version__"]
