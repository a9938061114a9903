"""Medical Segmentation Decathlon (Antonelli et al. 2022): ten ``TaskNN_Name/`` folders.

Layout read (every task)::

    TaskNN_Name/dataset.json   modality {"0": "FLAIR", "1": "T1w", ...}, labels
                               {"0": "background", "1": "edema", ...}, training [{image,
                               label}], test [paths]
    TaskNN_Name/imagesTr/*.nii.gz   3D, or 4D with the channels last (multi-modality tasks)
    TaskNN_Name/labelsTr/*.nii.gz

What the importer gets right (docs/datasets.md):

- **multi-modality**: a task with several ``modality`` entries (Task01 BrainTumour: 4 MR
  sequences; Task05 Prostate: T2, ADC) gives one 4D image per case with ``channels`` named in
  ``modality`` order and ``modality: "MR"``; a CT task stays ``"CT"`` (HU);
- **label names**: from the json's ``labels``, written to ``<manifest stem>.classes.json``;
- **splits**: MSD publishes labels only for ``training`` (the ``test`` images have none and are
  not imported); a seeded, case-level 80/20 train/val split is drawn; macOS ``._`` files
  listed in some archives are reported, not read.
"""

from __future__ import annotations

from pathlib import Path

from t3d_data.sources.base import ImportError_, ImportResult
from t3d_data.sources.decathlon import classes_of, modalities_of, read_decathlon_json, rows_of
from t3d_data.sources.splits import assign_patient_splits

__all__ = ["import_msd"]


def import_msd(root: str | Path, *, seed: int = 0, val_fraction: float = 0.2) -> ImportResult:
    """Imports one MSD task folder (the one holding ``dataset.json``).

    Raises:
        ImportError_: no ``dataset.json`` (naming the folder).
    """
    root = Path(root)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    path = root / "dataset.json"
    if not path.is_file():
        tasks = sorted(p.name for p in root.glob("Task*/dataset.json"))
        hint = f"; give one task folder, e.g. {root / tasks[0].split('/')[0]}" if tasks else ""
        raise ImportError_(f"{root}: no dataset.json (an MSD task folder holds one){hint}")
    data = read_decathlon_json(path)
    name = str(data.get("name") or root.name)
    result = ImportResult(f"msd:{name}")
    result.rows = rows_of(data, path, "training", result, "msd")
    for row in result.rows:
        row["patient_id"] = f"{name}_{row['study_id']}"
    assign_patient_splits(result.rows, {"train": 1 - val_fraction, "val": val_fraction}, seed)
    result.sidecars["classes"] = classes_of(data, path)
    channels = modalities_of(data)
    result.notes.append(f"task {name}: channels {channels}; {len(data.get('test') or [])} test "
                        "images have no labels and are not imported; splits: case-level "
                        f"{1 - val_fraction:.0%}/{val_fraction:.0%} train/val, seed {seed}")
    return result
