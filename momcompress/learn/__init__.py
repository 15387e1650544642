"""learn: per-expert hard-concrete block masks and routers on calibration text; ``momcompress.learn(...)``
(in momcompress/__init__.py) calls :func:`momcompress.learn.trainer.learn`."""
