"""learn: per-expert hard-concrete block masks and routers on calibration text; ``momcompress.learn(...)``
calls :func:`momcompress.learn.trainer.learn`."""

from momcompress._stage import make_callable

make_callable(__name__, "momcompress.learn.trainer:learn")
