"""Folder formats that other packages teach `momcompress.load` (a loader registry; no torch import).

The runtime reads MoM folders itself. A package whose folders hold other layers (the TEAL baseline)
registers a loader for its `method` name, as "module:function", resolved only when such a folder is
loaded; so the runtime never imports the packages that extend it.
"""

from __future__ import annotations

import importlib
from typing import Callable

FOLDER_LOADERS: dict[str, str] = {}


def register_folder_loader(method: str, target: str) -> None:
    """Let folders whose config section says method=METHOD load with TARGET ("module:function")."""
    FOLDER_LOADERS[method] = target


def folder_loader(method: str | None) -> Callable | None:
    """The registered loader of METHOD, or None for the runtime's own MoM folders."""
    target = FOLDER_LOADERS.get(method) if method else None
    if target is None:
        return None
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)
