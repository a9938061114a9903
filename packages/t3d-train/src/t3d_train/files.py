"""The one atomic-write helper of t3d_train: temp file, fsync, ``os.replace``, fsync the folder.

Every file t3d_train writes that a reader (or a resumed run) may meet half written goes through
:func:`write_bytes_atomic`: checkpoint state files and markers, ``log.jsonl`` after a trim,
``summary.json``, ``config.json`` of a run, the loss plot, and the benchmark's per-run values,
``intervals.json``, ``summary.md`` and results section. A reader sees the old file or the
new one, never part of one. (The packages cannot depend on t3d_train; they keep their own:
``t3d_data.store``, ``t3d_models.io``, ``t3d_eval.results``.)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every folder, deepest first."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file, fsync it, ``os.replace`` it into place, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` (UTF-8) written with :func:`write_bytes_atomic`."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, payload: Any) -> None:
    """``json.dumps(payload, indent=2)`` written with :func:`write_text_atomic`."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=str))


def jsonable(x: Any) -> Any:
    """``x`` with dict keys as strings, tuples as lists, NaN/inf as ``None`` and numpy/torch
    scalars as Python numbers, for ``json.dumps(..., allow_nan=False)``."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item") and not isinstance(x, str):
        return jsonable(x.item())
    return x
