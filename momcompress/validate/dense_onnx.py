"""The dense model's ONNX export, made once and kept in the momcompress cache, for validate's timings.

validate compares the onnxruntime latency of a MoM export with that of its dense original, exported the
same way. The dense export depends only on the dense weights and on the export settings, so it is made
once per (model fingerprint, settings) and reused:

    $MOMCOMPRESS_CACHE/onnx-dense/<model name>-<sha256 of the weights, 12>-<sha256 of the settings, 8>/

The settings are those of the MoM export it is compared with (opset, dtype) plus what else changes the
graph: the versions of momcompress, torch and onnx, and the exporter's own source (a hash of
export/exporter.py and export/causal_lm.py, so an edited exporter never reuses a stale export). The folder is written under a unique temporary name and
renamed into place, so concurrent validations never see a half-written export (the loser of a race
drops its copy).

    folder = cached_dense_export(Path("~/.cache/momcompress/models/smollm2-..."), sparse_manifest)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from momcompress.errors import ExportError

log = logging.getLogger(__name__)

CACHE_SUBDIR = "onnx-dense"
ONNX_FILE = "model.onnx"


def read_export_manifest(export: str | os.PathLike) -> dict | None:
    """manifest.json of an export folder (or of the folder of a model.onnx); None when it has none.

    Raises:
        ExportError: no model.onnx there, or an unreadable manifest.
    """
    path = Path(export)
    folder = path if path.is_dir() else path.parent
    if not (folder / ONNX_FILE).is_file():
        raise ExportError(f"{export} holds no {ONNX_FILE}: pass --onnx the folder written by `momcompress export`")
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{manifest} is not readable JSON ({e}); export again") from None


def export_settings(sparse_manifest: dict | None) -> dict:
    """The settings a dense export must share with the MoM export it is compared with (from its manifest)."""
    import onnx
    import torch

    from momcompress import __version__
    from momcompress.export.exporter import DEFAULT_OPSET

    from momcompress.export import causal_lm, exporter

    code = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (exporter, causal_lm))).hexdigest()[:12]
    m = sparse_manifest or {}
    return {"opset": m.get("opset", DEFAULT_OPSET), "dtype": m.get("dtype", "float32"), "momcompress": __version__,
            "torch": torch.__version__, "onnx": onnx.__version__, "exporter_code": code}


def cache_folder(dense_dir: Path, settings: dict, fingerprint: str) -> Path:
    """Where the dense export of dense_dir with these settings lives in the cache."""
    from momcompress.models import cache_dir

    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return cache_dir() / CACHE_SUBDIR / f"{dense_dir.resolve().name}-{fingerprint[:12]}-{key}"


def cached_dense_export(dense_dir: Path, sparse_manifest: dict | None, fingerprint: str | None = None) -> Path:
    """The folder of dense_dir's ONNX export with the MoM export's settings; exported (and checked) once.

    Args:
        dense_dir: the dense model folder (resolved: not "default").
        sparse_manifest: manifest.json of the MoM export it will be compared with (None: default settings).
        fingerprint: model_fingerprint(dense_dir), if already computed.

    Raises:
        ExportError: the dense export failed (its checklist is in the message).
    """
    from momcompress.export.exporter import export
    from momcompress.models import model_fingerprint

    settings = export_settings(sparse_manifest)
    if settings["dtype"] != "float32":
        raise ExportError(f"the MoM export is {settings['dtype']}; the cached dense export is float32 only: export the "
                          "dense model yourself (`momcompress export --dense`) and pass it with --onnx-dense")
    target = cache_folder(dense_dir, settings, fingerprint or model_fingerprint(dense_dir))
    if (target / ONNX_FILE).is_file():
        return target
    log.warning("exporting the dense model %s to ONNX once, into %s", dense_dir, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        export(dense_dir, tmp / "export", dense=True, opset=settings["opset"])
        try:
            os.replace(tmp / "export", target)
        except OSError:
            if not (target / ONNX_FILE).is_file():  # not a concurrent export winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
