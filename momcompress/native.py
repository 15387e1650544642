"""Compile momcompress's C++ kernels on the user's machine and cache the libraries (no build step at install).

Two libraries use this: the onnxruntime ops (export/ort_ops.py) and the PyTorch CPU ops
(kernels/cpu_native.py). Each is compiled from its sources with the system's C++ compiler (`$CXX`,
default g++) into `$MOMCOMPRESS_CACHE/<subdir>/<sources hash>-<build hash>/<library>`, written under a
temporary name and renamed (a crash leaves no half-written library). The sources hash covers every file
compiled or included; the build hash covers the compiler's version, the flags and whatever else the caller
names (onnxruntime's headers). So an edited source needs a new build, and `find` never returns a stale one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

from momcompress.errors import MomcompressError

log = logging.getLogger(__name__)


class NativeBuildError(MomcompressError):
    """A C++ library could not be compiled (the compiler's messages are in the error)."""


class NativeUnavailableError(NativeBuildError):
    """This machine has no C++ compiler (or a tool the build runs is missing or hangs)."""


def run(cmd: Sequence[str], cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run cmd, capturing its output; NativeUnavailableError when the program is missing or takes > timeout s."""
    try:
        return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise NativeUnavailableError(f"`{cmd[0]}` is not installed here") from None
    except subprocess.TimeoutExpired:
        raise NativeUnavailableError(f"`{' '.join(list(cmd)[:3])} ...` took more than {timeout} s") from None


def compiler() -> tuple[str, str]:
    """(compiler command, its version line); NativeUnavailableError when there is none."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise NativeUnavailableError(f"no C++ compiler `{cxx}` here (install g++, e.g. `apt-get install g++`, or set CXX)")
    proc = run([cxx, "--version"])
    return cxx, (proc.stdout.splitlines() or ["unknown"])[0].strip()


def sources_hash(paths: Sequence[Path]) -> str:
    """A short hash of the files' names and contents, in order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes())
    return digest.hexdigest()[:16]


def cache_root(subdir: str) -> Path:
    from momcompress.models import cache_dir

    return cache_dir() / subdir


def find(subdir: str, library: str, sources: Sequence[Path]) -> Path | None:
    """The newest library built from exactly these sources, or None."""
    found = sorted(cache_root(subdir).glob(f"{sources_hash(sources)}-*/{library}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def find_library(subdir: str, library: str, sources: Sequence[Path], env: str,
                 error: type[MomcompressError] = NativeBuildError) -> Path | None:
    """The library $env names (a path), None when $env is `off`, else the one built from these sources (or None).
    A path that is not a file raises `error`."""
    value = os.environ.get(env, "").strip()
    if value.lower() == "off":
        return None
    if value:
        path = Path(value)
        if not path.is_file():
            raise error(f"{env}={value} is not a file: point it at a {library}, unset it, or set it to off")
        return path
    return find(subdir, library, sources)


def build(subdir: str, library: str, sources: Sequence[Path], flags: Sequence[str], *, compile_only: Sequence[Path],
          key: Sequence[str] = (), force: bool = False, describe: str = "") -> Path:
    """Compile compile_only (with the other sources as headers) into the cached library; return its path.

    Args:
        subdir: the cache subfolder ("ort-ops", "cpu-ops").
        library: the file name of the shared library.
        sources: every file whose contents the library depends on (compiled files and headers).
        flags: compiler flags (include folders among them).
        compile_only: the translation units to compile.
        key: anything else the build depends on (e.g. a header set's version), hashed into the folder name.
        force: rebuild even when the library is cached.
        describe: a line written to the build record (what the library is for).
    Raises:
        NativeUnavailableError: no compiler. NativeBuildError: the compiler failed.
    """
    cxx, version = compiler()
    build_key = hashlib.sha256("\n".join([version, *flags, *key]).encode()).hexdigest()[:8]
    folder = cache_root(subdir) / f"{sources_hash(sources)}-{build_key}"
    path = folder / library
    if path.is_file() and not force:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=library + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    cmd = [cxx, *flags, *(str(p) for p in compile_only), "-o", tmp]
    log.info("compiling %s: %s", library, " ".join(cmd))
    proc = run(cmd)
    if proc.returncode != 0:
        os.remove(tmp)
        raise NativeBuildError(f"compiling {library} failed ({cxx} exit {proc.returncode}):\n{proc.stderr.strip()[-4000:]}")
    os.replace(tmp, path)
    (folder / "build.txt").write_text(f"{' '.join(cmd)}\n{version}\n{describe}\n")
    return path
