"""Stage subpackages that are also callable: ``momcompress.freeze(...)`` runs the stage while
``momcompress.freeze.plan`` stays a module (a function of the same name would be shadowed by the
subpackage as soon as one of its modules is imported)."""

from __future__ import annotations

import importlib
import sys
import types


def make_callable(package: str, target: str) -> None:
    """Make the module `package` call `target` ("module:function") when called."""
    module_name, func_name = target.split(":")

    class _StageModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(importlib.import_module(module_name), func_name)(*args, **kwargs)

    sys.modules[package].__class__ = _StageModule
