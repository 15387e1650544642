"""Filesystem helpers: write output folders so that a reader never sees a half-written one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def atomic_dir_write(target: Path, write: Callable[[Path], None]) -> None:
    """Write a folder via a temporary name, then swap it in (an old one survives until the swap).

    If `write` fails, the temporary folder is removed and `target` is untouched.
    """
    tmp = target.with_name(target.name + ".tmp")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
