"""BTCV (Beyond the Cranial Vault, MICCAI 2015 multi-atlas abdomen challenge): 30 labelled
abdominal CT volumes, 13 organs.

Layout read (MONAI research-contributions, ``SwinUNETR/BTCV``)::

    imagesTr/img0001.nii.gz ...   labelsTr/label0001.nii.gz ...
    dataset_0.json                the standard split: 24 ``training`` + 6 ``validation``

What the importer gets right (docs/datasets.md):

- **the standard split**: ``dataset_0.json``'s ``training`` -> train, ``validation`` -> val
  (every paper's BTCV numbers use it); when the file is absent the same lists are built in
  (:data:`STANDARD_SPLIT`, copied from that file);
- **class names**: from the json's ``labels`` (``spleen``, ``rkid``, ... ``lad``), written to
  ``<manifest stem>.classes.json`` (``{name: [label value]}``);
- each case is its own patient; no report (pre-training refuses the store).
"""

from __future__ import annotations

from pathlib import Path

from t3d_data.sources.base import ImportResult
from t3d_data.sources.decathlon import classes_of, read_decathlon_json, rows_of

__all__ = ["LABELS", "STANDARD_SPLIT", "import_btcv", "standard_split_json"]

#: ``dataset_0.json``: case numbers of ``training`` (24) and ``validation`` (6).
STANDARD_SPLIT = {"training": [*range(1, 11), *range(21, 35)], "validation": list(range(35, 41))}
#: ``labels`` of ``dataset_0.json``.
LABELS = {"0": "background", "1": "spleen", "2": "rkid", "3": "lkid", "4": "gall", "5": "eso",
          "6": "liver", "7": "sto", "8": "aorta", "9": "IVC", "10": "veins", "11": "pancreas",
          "12": "rad", "13": "lad"}
SPLIT_FILE = "dataset_0.json"


def standard_split_json() -> dict:
    """The content of MONAI's ``dataset_0.json`` that the importer uses (no ``test`` list)."""
    return {"description": "btcv yucheng", "labels": dict(LABELS), "modality": {"0": "CT"},
            "name": "btcv", "tensorImageSize": "3D",
            **{section: [{"image": f"imagesTr/img{k:04d}.nii.gz",
                          "label": f"labelsTr/label{k:04d}.nii.gz"} for k in cases]
               for section, cases in STANDARD_SPLIT.items()}}


def import_btcv(root: str | Path, *, split_file: str | Path | None = None) -> ImportResult:
    """Imports a BTCV folder (see the module docstring).

    Args:
        root: the folder holding ``imagesTr/`` and ``labelsTr/``.
        split_file: the split json (default ``ROOT/dataset_0.json``, else the built-in copy).
    """
    root = Path(root)
    path = Path(split_file) if split_file is not None else root / SPLIT_FILE
    result = ImportResult("btcv")
    if split_file is None and not path.is_file():
        data = standard_split_json()  # paths resolve against ROOT, as the file's would
        result.notes.append(f"{path} not found: used the built-in copy of MONAI's standard "
                            "split")
    else:
        data = read_decathlon_json(path)
    for section, split in (("training", "train"), ("validation", "val")):
        for row in rows_of(data, path, section, result, "btcv"):
            row["split"] = split
            row["patient_id"] = f"btcv_{row['study_id']}"
            result.rows.append(row)
    result.sidecars["classes"] = classes_of(data, path)
    result.notes.append("splits: dataset_0.json training -> train, validation -> val")
    return result
