"""The momcompress custom-op library for onnxruntime's CPU provider: build it, find it, register it.

`export/csrc/momcompress_ort_ops.cc` implements `momcompress::MoMExperts` (the routed experts of every
exported MoM layer), `momcompress::SelectedRowsFFN` (per-token selected rows, see export/op.py) and
`momcompress::SelectFFN` (the per-token selector's FFN, export/select_op.py) as compiled kernels that
multiply the selected rows where they lie, on onnxruntime's intra-op threads. An exported model does not
need it: each node carries an ONNX function body of standard ops, which onnxruntime runs when the library
is not registered (slower: standard ops copy the rows first, or multiply the dropped ones too).

    momcompress build-ops          # once per machine (the README's install line runs it)

1. Headers: onnxruntime's C API headers of API version 21 (onnxruntime 1.21), from `$ORT_INCLUDE_DIR`
   or Debian's `libonnxruntime-dev` package, fetched with `apt-get download` and unpacked with
   `dpkg -x` into the cache (no root, nothing installed). Where the system's apt sources do not carry
   the package (Debian 12), the same archive's `trixie` suite is read through a private apt state in
   the cache. A library built on API N loads in onnxruntime 1.N and newer, so the oldest API wins.
2. Compile with the system's C++ compiler (`$CXX`, default g++) into
   `$MOMCOMPRESS_CACHE/ort-ops/<source hash>-<build hash>/libmomcompress_ort_ops.so`, written under a
   temporary name and renamed. The build hash covers the compiler, the flags and the headers' API.
3. At run time `register(session_options)` finds the library built from this very source (an edited
   source needs a new build), checks that onnxruntime serves the library's API version, and registers it.
   `$MOMCOMPRESS_ORT_OPS` overrides: a path to a library, or `off` (always the function body).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from momcompress import native
from momcompress.errors import ExportError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "momcompress_ort_ops.cc"
# The row kernel SelectFFN shares with the PyTorch CPU ops (momcompress/kernels/csrc/select_rows.h).
KERNELS_CSRC = Path(__file__).resolve().parent.parent / "kernels" / "csrc"
if not KERNELS_CSRC.is_dir():  # a source checkout: export/ sits beside momcompress/
    KERNELS_CSRC = Path(__file__).resolve().parent.parent / "momcompress" / "kernels" / "csrc"
SOURCES = (SOURCE, KERNELS_CSRC / "select_rows.h", KERNELS_CSRC / "amx_select.h")
LIBRARY_NAME = "libmomcompress_ort_ops.so"
API_VERSION = 21  # the C API the headers we fetch declare (onnxruntime 1.21)
HEADERS_PACKAGE = "libonnxruntime-dev"
HEADERS_SUITE = "trixie"  # Debian suite whose libonnxruntime-dev is 1.21.0 (API 21)
CACHE_SUBDIR = "ort-ops"
ENV_LIBRARY = "MOMCOMPRESS_ORT_OPS"
ENV_INCLUDE = "ORT_INCLUDE_DIR"
CXXFLAGS = ("-std=c++17", "-O3", "-ffp-contract=fast", "-fPIC", "-shared", "-fvisibility=hidden")
BUILD_COMMAND = "momcompress build-ops"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
KERNEL, FUNCTION_BODY = "kernel", "function body"  # which path ran MoMExperts / SelectFFN (OrtCausalLM.experts_path)


class OrtOpsError(ExportError):
    """The momcompress onnxruntime ops library cannot be built, found or registered."""


class OrtOpsUnavailableError(OrtOpsError):
    """This machine lacks what the build needs (a C++ compiler, or onnxruntime's headers)."""


class OrtOpsVersionError(OrtOpsError):
    """The library was built for a newer onnxruntime C API than the installed onnxruntime serves."""


def missing_message(reason: str | None = None) -> str:
    """The one line shown when a MoM export runs without the library."""
    why = f" ({reason})" if reason else ""
    return (f"the momcompress onnxruntime kernel is not built{why}: run `{BUILD_COMMAND}`; until then MoMExperts runs "
            "and SelectFFN run their ONNX function bodies (same results, slower)")


# ----------------------------------------------------------------------------- headers
def header_api_version(include_dir: Path) -> int:
    """ORT_API_VERSION declared by include_dir/onnxruntime_c_api.h."""
    text = (include_dir / "onnxruntime_c_api.h").read_text(errors="replace")
    match = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", text)
    if not match:
        raise OrtOpsError(f"{include_dir / 'onnxruntime_c_api.h'} declares no ORT_API_VERSION: not onnxruntime's C API header")
    return int(match.group(1))


def _include_dir_in(root: Path) -> Path | None:
    for candidate in (root, root / "onnxruntime", root / "include" / "onnxruntime", root / "usr" / "include" / "onnxruntime"):
        if (candidate / "onnxruntime_c_api.h").is_file():
            return candidate
    return None


def headers_cache() -> Path:
    from momcompress.models import cache_dir

    return cache_dir() / CACHE_SUBDIR / "headers"


def find_headers(fetch: bool = True) -> Path:
    """The folder holding onnxruntime_c_api.h: $ORT_INCLUDE_DIR, else the cache (fetched when missing and fetch)."""
    env = os.environ.get(ENV_INCLUDE)
    if env:
        found = _include_dir_in(Path(env))
        if found is None:
            raise OrtOpsUnavailableError(f"{ENV_INCLUDE}={env} holds no onnxruntime_c_api.h: point it at onnxruntime's include folder")
        return found
    found = _include_dir_in(headers_cache())
    if found is not None:
        return found
    if not fetch:
        raise OrtOpsUnavailableError(f"onnxruntime's headers are not in {headers_cache()}: run `{BUILD_COMMAND}`")
    return fetch_headers()


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return native.run(cmd, cwd=cwd)
    except native.NativeUnavailableError as exc:
        raise OrtOpsUnavailableError(str(exc)) from None


def debian_archive(root: Path = Path("/etc/apt")) -> tuple[str, str] | None:
    """(URI, keyring) of the Debian archive in the apt sources under root (not the security archive), or None."""
    entries: list[tuple[str, str]] = []
    files = [root / "sources.list", *sorted((root / "sources.list.d").glob("*.list")), *sorted((root / "sources.list.d").glob("*.sources"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":  # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, flags=re.M))
                if "deb" in fields.get("Types", "").split() and fields.get("URIs"):
                    entries += [(uri, fields.get("Signed-By", "")) for uri in fields["URIs"].split()]
        else:
            for line in text.splitlines():
                m = re.match(r"^\s*deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s", line)
                if m:
                    signed = re.search(r"signed-by=(\S+)", m.group(1) or "")
                    entries.append((m.group(2), signed.group(1) if signed else ""))
    for uri, keyring in entries:
        if uri.rstrip("/").endswith("/debian"):
            key = keyring if keyring.startswith("/") and Path(keyring).is_file() else str(DEBIAN_KEYRING)
            return uri, key
    return None


def _download_deb(workdir: Path) -> Path:
    """Download HEADERS_PACKAGE's .deb into workdir with apt-get (system sources first, then HEADERS_SUITE)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise OrtOpsUnavailableError(f"no apt-get/dpkg here to fetch {HEADERS_PACKAGE}: set {ENV_INCLUDE} to onnxruntime's "
                                     "include folder (headers of onnxruntime 1.21, API 21)")
    first = _run(["apt-get", "download", HEADERS_PACKAGE], cwd=workdir)
    debs = sorted(workdir.glob(f"{HEADERS_PACKAGE}_*.deb"))
    if first.returncode == 0 and debs:
        return debs[0]
    archive = debian_archive()
    if archive is None:
        raise OrtOpsUnavailableError(f"`apt-get download {HEADERS_PACKAGE}` failed ({_last_line(first)}) and no Debian "
                                     f"archive is configured in /etc/apt to read the {HEADERS_SUITE} suite from: set {ENV_INCLUDE}")
    uri, keyring = archive
    state = workdir / "apt"
    for sub in ("lists/partial", "archives/partial", "etc/sources.list.d", "etc/preferences.d"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "etc" / "sources.list").write_text(f"deb [signed-by={keyring}] {uri} {HEADERS_SUITE} main\n")
    opts = [f"-oDir::Etc::SourceList={state / 'etc' / 'sources.list'}", f"-oDir::Etc::SourceParts={state / 'etc' / 'sources.list.d'}",
            f"-oDir::Etc::Preferences={state / 'etc' / 'preferences'}", f"-oDir::Etc::PreferencesParts={state / 'etc' / 'preferences.d'}",
            f"-oDir::State={state}", f"-oDir::State::Lists={state / 'lists'}", f"-oDir::Cache={state}",
            f"-oDir::Cache::Archives={state / 'archives'}", "-oDebug::NoLocking=1", "-oAPT::Sandbox::User=root"]
    log.info("reading %s's %s suite for %s (private apt state in %s)", uri, HEADERS_SUITE, HEADERS_PACKAGE, state)
    update = _run(["apt-get", *opts, "update"])
    if update.returncode != 0:
        raise OrtOpsUnavailableError(f"could not read the {HEADERS_SUITE} package list from {uri} ({_last_line(update)}): "
                                     f"set {ENV_INCLUDE} to onnxruntime's include folder")
    second = _run(["apt-get", *opts, "download", HEADERS_PACKAGE], cwd=workdir)
    debs = sorted(workdir.glob(f"{HEADERS_PACKAGE}_*.deb"))
    if second.returncode != 0 or not debs:
        raise OrtOpsUnavailableError(f"`apt-get download {HEADERS_PACKAGE}` failed in the {HEADERS_SUITE} suite too "
                                     f"({_last_line(second)}): set {ENV_INCLUDE} to onnxruntime's include folder")
    return debs[0]


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in (proc.stderr or proc.stdout or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit {proc.returncode}"


def fetch_headers() -> Path:
    """Fetch and unpack HEADERS_PACKAGE into headers_cache() (atomically); return its include folder."""
    target = headers_cache()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="headers.", dir=target.parent) as tmp:
        work = Path(tmp)
        deb = _download_deb(work)
        unpacked = work / "tree"
        proc = _run(["dpkg", "-x", str(deb), str(unpacked)])
        include = _include_dir_in(unpacked)
        if proc.returncode != 0 or include is None:
            raise OrtOpsUnavailableError(f"`dpkg -x {deb.name}` gave no onnxruntime_c_api.h ({_last_line(proc)}): set {ENV_INCLUDE}")
        api = header_api_version(include)
        if api != API_VERSION:
            log.warning("%s carries onnxruntime C API %d, not %d: the library will need onnxruntime >= 1.%d", deb.name, api, API_VERSION, api)
        (unpacked / "SOURCE").write_text(deb.name + "\n")
        try:
            os.replace(unpacked, target)
        except OSError:  # another process unpacked them first
            if _include_dir_in(target) is None:
                raise
    return _include_dir_in(target)


# ----------------------------------------------------------------------------- build
def source_hash() -> str:
    return native.sources_hash(SOURCES)


def compiler() -> tuple[str, str]:
    """(compiler command, its version line); OrtOpsUnavailableError when there is none."""
    try:
        return native.compiler()
    except native.NativeUnavailableError as exc:
        raise OrtOpsUnavailableError(str(exc)) from None


def ops_root() -> Path:
    return native.cache_root(CACHE_SUBDIR)


def build(force: bool = False) -> Path:
    """Build the library for this source (fetching the headers if needed) and return its path; cached.

    Raises:
        OrtOpsUnavailableError: no compiler, or no headers (not fetchable, and no ORT_INCLUDE_DIR).
        OrtOpsError: the compiler failed (its messages are in the error).
    """
    compiler()
    include = find_headers()
    api = header_api_version(include)
    headers = hashlib.sha256((include / "onnxruntime_c_api.h").read_bytes()).hexdigest()
    try:
        return native.build(CACHE_SUBDIR, LIBRARY_NAME, SOURCES, [*CXXFLAGS, f"-I{include}", f"-I{KERNELS_CSRC}"],
                            compile_only=[SOURCE], key=[str(api), headers], force=force,
                            describe=f"onnxruntime C API {api}")
    except native.NativeUnavailableError as exc:
        raise OrtOpsUnavailableError(str(exc)) from None
    except native.NativeBuildError as exc:
        raise OrtOpsError(f"the momcompress onnxruntime ops: {exc}") from None


def find_library() -> Path | None:
    """The library built from this source ($MOMCOMPRESS_ORT_OPS overrides), or None (not built / `off`)."""
    return native.find_library(CACHE_SUBDIR, LIBRARY_NAME, SOURCES, ENV_LIBRARY, OrtOpsError)


def library_api_version(path: Path) -> int:
    """The onnxruntime C API version the library at path was compiled against."""
    import ctypes

    try:
        lib = ctypes.CDLL(str(path))
        return int(lib.MomcompressOrtOpsApiVersion())
    except (OSError, AttributeError) as exc:
        raise OrtOpsError(f"{path} is not a momcompress ops library ({exc}): rebuild it with `{BUILD_COMMAND} --force`") from None


def runtime_api_version() -> int:
    """The newest C API the installed onnxruntime serves (onnxruntime 1.N serves API N)."""
    import onnxruntime

    major, minor = (int(p) for p in onnxruntime.__version__.split(".")[:2])
    return minor if major == 1 else 10**6


def register(options, library: Path | None = None, required: bool = False) -> Path | None:
    """Register the library in onnxruntime SessionOptions; return its path, or None when it is not built.

    Args:
        options: an onnxruntime.SessionOptions.
        library: a library path (default: find_library()).
        required: raise OrtOpsError instead of returning None when there is no library.
    Raises:
        OrtOpsVersionError: built for a newer C API than this onnxruntime serves.
        OrtOpsError: not a loadable library, or onnxruntime refused it.
    """
    path = Path(library) if library is not None else find_library()
    if path is None:
        if required:
            raise OrtOpsError(missing_message())
        return None
    api = library_api_version(path)
    runtime = runtime_api_version()
    if api > runtime:
        import onnxruntime

        raise OrtOpsVersionError(
            f"{path} was built against onnxruntime C API {api} (onnxruntime 1.{api}) but onnxruntime {onnxruntime.__version__} "
            f"serves API {runtime}: upgrade onnxruntime (pip install -U onnxruntime), or rebuild against API-{runtime} headers "
            f"({ENV_INCLUDE}=... {BUILD_COMMAND} --force), or set {ENV_LIBRARY}=off to run the function body")
    try:
        options.register_custom_ops_library(str(path))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises untyped errors
        raise OrtOpsError(f"onnxruntime refused {path}: {exc}; rebuild it with `{BUILD_COMMAND} --force`") from None
    return path


def amx_usable(library: Path) -> bool:
    """Whether the library's SelectFFN runs its AMX path here (bf16 tables, fp32 x, 5 tokens or more): the CPU has
    AMX-BF16 and the OS grants the tile state, and MOMCOMPRESS_AMX is not `off`."""
    if os.environ.get("MOMCOMPRESS_AMX", "").strip().lower() == "off":
        return False
    try:
        return bool(ctypes.CDLL(str(library)).momcompress_ort_amx_usable())
    except (OSError, AttributeError):
        return False


def status() -> dict:
    """What `momcompress build-ops --status` prints: the library found (if any), the source hash and the cache."""
    library = find_library()
    out = {"source": str(SOURCE), "source_hash": source_hash(), "cache": str(ops_root()), "library": str(library) if library else None}
    if library:
        out["api_version"] = library_api_version(library)
    return out
