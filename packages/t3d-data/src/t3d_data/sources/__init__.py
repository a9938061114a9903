"""Importers of public datasets: their files, as distributed, into the project's manifest.

``t3d-data import <dataset> ROOT -o manifest.jsonl`` (or :func:`import_dataset` +
:func:`write_import`) writes a manifest whose records point at the dataset's own volumes (none
is copied), plus ``<manifest stem>.prompts.json`` (zero-shot prompts) or
``<manifest stem>.classes.json`` (segmentation classes) where the dataset has them. One module
per dataset; each module's docstring gives the layout it reads and the pitfalls it handles;
docs/datasets.md gives licences, downloads and the commands from download to benchmark.
:func:`t3d_data.sources.replica.write_replica` writes a tiny synthetic copy of each layout
(the tests import those).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from t3d_data.sources.base import BadRow, ImportError_, ImportResult

__all__ = ["DATASETS", "BadRow", "ImportError_", "ImportResult", "import_dataset",
           "write_import"]

#: dataset name -> (module, function, one-line description).
DATASETS: dict[str, tuple[str, str, str]] = {
    "ct-rate": ("ct_rate", "import_ct_rate", "CT-RATE chest CT + English reports + 18 labels"),
    "bimcv-r": ("bimcv_r", "import_bimcv_r", "BIMCV-R chest CT + Spanish reports"),
    "rad-chestct": ("rad_chestct", "import_rad_chestct",
                    "RAD-ChestCT labels (shared with CT-RATE), no reports"),
    "btcv": ("btcv", "import_btcv", "BTCV 13-organ abdominal CT segmentation"),
    "msd": ("msd", "import_msd", "Medical Segmentation Decathlon, one task folder"),
    "brats": ("brats", "import_brats", "BraTS 4-sequence MRI brain tumour segmentation"),
}


def _importer(name: str) -> Callable[..., ImportResult]:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    module, func, _ = DATASETS[name]
    return getattr(importlib.import_module(f"t3d_data.sources.{module}"), func)


def import_dataset(name: str, root: str | Path, **options: Any) -> ImportResult:
    """Runs one importer; ``options`` the importer does not take are ignored when ``None``.

    Raises:
        ValueError: unknown dataset, or an option the importer does not take.
        ImportError_: the folder lacks the dataset's layout.
    """
    fn = _importer(name)
    accepted = inspect.signature(fn).parameters
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise ValueError(f"{flags} does not apply to {name}")
    root = Path(root)
    if not root.is_dir():
        raise ImportError_(f"{root}: not a folder; give the dataset's download folder")
    return fn(root, **given)


def write_import(result: ImportResult, out: str | Path) -> list[Path]:
    """Writes the manifest (atomically) and its sidecars, then validates the manifest.

    Returns:
        The files written (manifest first).

    Raises:
        ImportError_: no usable study (naming the first bad rows).
        ManifestError: the written manifest does not validate (a bug of the importer).
    """
    from t3d_data.manifest import load_manifest
    from t3d_data.sources.base import write_json_atomic, write_manifest

    out = Path(out)
    if not result.rows:
        shown = "; ".join(map(str, (result.bad + result.missing)[:3])) or "no rows found"
        raise ImportError_(f"{result.dataset}: no usable study ({shown})")
    write_manifest(out, result.rows)
    written = [out]
    for suffix, obj in result.sidecars.items():
        path = out.with_name(f"{out.stem}.{suffix}.json")
        write_json_atomic(path, obj)
        written.append(path)
    load_manifest(out)
    return written
