"""freeze: turn learned gates into shared / routed / pruned expert groups and a loadable model folder;
``momcompress.freeze(...)`` (in momcompress/__init__.py) calls :func:`momcompress.freeze.freezer.freeze`."""
