"""Decathlon-style ``dataset.json`` files (MSD and MONAI's BTCV split file ``dataset_0.json``).

Keys used: ``modality`` (``{"0": "CT"}`` or several MR sequences), ``labels``
(``{"0": "background", "1": "spleen", ...}``), ``training`` and ``validation`` (lists of
``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``, relative to the json's
folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from t3d_data.sources.base import BadRow, ImportError_, ImportResult

__all__ = ["classes_of", "read_decathlon_json", "rows_of"]


def read_decathlon_json(path: Path) -> dict[str, Any]:
    """The parsed json (ImportError_ naming the file on a missing/invalid one)."""
    if not path.is_file():
        raise ImportError_(f"{path}: not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ImportError_(f"{path}: invalid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("labels"), dict):
        raise ImportError_(f"{path}: expected an object with a 'labels' object")
    return data


def classes_of(data: dict[str, Any], path: Path) -> dict[str, list[int]]:
    """``{label name: [value]}`` of the json's ``labels`` without the background (value 0)."""
    classes = {}
    for key, name in data["labels"].items():
        try:
            value = int(key)
        except ValueError:
            raise ImportError_(f"{path}: labels key {key!r} is not an integer") from None
        if value > 0:
            classes[str(name)] = [value]
    if not classes:
        raise ImportError_(f"{path}: 'labels' names no class besides the background")
    return classes


def modalities_of(data: dict[str, Any]) -> list[str]:
    """Channel names in channel order (``modality`` sorted by its integer keys)."""
    modality = data.get("modality") or {"0": "CT"}
    return [str(modality[k]) for k in sorted(modality, key=lambda k: int(k))]


def rows_of(data: dict[str, Any], path: Path, section: str, result: ImportResult,
            dataset: str) -> list[dict[str, Any]]:
    """Manifest rows (without ``split``) of one section; bad entries go to ``result.bad``."""
    entries = data.get(section) or []
    if not isinstance(entries, list):
        raise ImportError_(f"{path}: '{section}' must be a list")
    channels = modalities_of(data)
    modality = "CT" if all(c.upper() == "CT" for c in channels) else "MR"
    base = path.parent
    rows = []
    for k, entry in enumerate(entries):
        where = f"'{section}'[{k}]"
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            result.bad.append(BadRow(path, None, f"{where}: expected an object with 'image' and "
                                     "'label'"))
            continue
        image, label = base / entry["image"], base / entry["label"]
        name = Path(entry["image"]).name
        if name.startswith("._"):  # macOS resource forks shipped in some MSD archives
            result.bad.append(BadRow(path, None, f"{where}: {name} is a macOS '._' file"))
            continue
        missing = [p for p in (image, label) if not p.is_file()]
        if missing:
            result.missing.append(BadRow(missing[0], None, f"{where}: file not on disk"))
            continue
        case = name.split(".nii")[0]
        row: dict[str, Any] = {"study_id": case, "patient_id": case,
                               "image": str(image.resolve()), "mask": str(label.resolve()),
                               "modality": modality,
                               "meta": {dataset: {"section": section}}}
        if len(channels) > 1:
            row["channels"] = channels  # one 4D file, channels last
        rows.append(row)
    return rows
