"""freeze: turn learned gates into shared / routed / pruned expert groups and a loadable model folder;
``momcompress.freeze(...)`` calls :func:`momcompress.freeze.freezer.freeze`."""

from momcompress._stage import make_callable

make_callable(__name__, "momcompress.freeze.freezer:freeze")
