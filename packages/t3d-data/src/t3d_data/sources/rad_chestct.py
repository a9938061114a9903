"""RAD-ChestCT (Draelos et al. 2021, Duke; public subset on Zenodo): chest CT volumes with
abnormality x location labels and no reports, the usual external zero-shot test set.

Layout read::

    img{train,valid,test}_Abnormality_and_Location_Labels.csv
        NoteAcc_DEID (the volume id, e.g. tst32123), then one 0/1 column per
        ``<abnormality>*<location>`` (e.g. ``nodule*right_lung``)
    <NoteAcc_DEID>.nii.gz (or .nii), anywhere under the folder

The Zenodo release stores volumes as ``.npz`` arrays; convert them to NIfTI first (the readers
take NIfTI and DICOM; docs/datasets.md).

What the importer gets right (docs/datasets.md):

- **the labels shared with CT-RATE**: an abnormality is present when any of its location
  columns is 1; only the abnormalities with a CT-RATE counterpart are kept, under the CT-RATE
  name (:data:`SHARED_LABELS`), so a CT-RATE-trained model's prompts apply unchanged;
- **no reports**: records have no ``report`` (a store of them is for evaluation only;
  pre-training refuses it);
- **splits**: the official train/valid/test label files map to train/val/test; the public
  subset carries no patient ids, so each volume is its own patient.
"""

from __future__ import annotations

from pathlib import Path

from t3d_data.sources.base import BadRow, ImportError_, ImportResult, read_csv_rows

__all__ = ["LABEL_FILES", "SHARED_LABELS", "import_rad_chestct"]

#: RAD-ChestCT abnormality (column prefix before ``*``) -> CT-RATE abnormality name.
SHARED_LABELS = {
    "cardiomegaly": "Cardiomegaly",
    "pericardial_effusion": "Pericardial effusion",
    "lymphadenopathy": "Lymphadenopathy",
    "emphysema": "Emphysema",
    "atelectasis": "Atelectasis",
    "nodule": "Lung nodule",
    "opacity": "Lung opacity",
    "pleural_effusion": "Pleural effusion",
    "consolidation": "Consolidation",
    "bronchiectasis": "Bronchiectasis",
    "septal_thickening": "Interlobular septal thickening",
}
#: official split -> label CSV name.
LABEL_FILES = {"train": "imgtrain_Abnormality_and_Location_Labels.csv",
               "val": "imgvalid_Abnormality_and_Location_Labels.csv",
               "test": "imgtest_Abnormality_and_Location_Labels.csv"}
ID_COLUMN = "NoteAcc_DEID"


def import_rad_chestct(root: str | Path) -> ImportResult:
    """Imports a RAD-ChestCT folder (see the module docstring).

    Raises:
        ImportError_: none of the label CSVs is there.
    """
    root = Path(root)
    present = {s: root / n for s, n in LABEL_FILES.items() if (root / n).is_file()}
    if not present:
        raise ImportError_(f"{root}: none of {', '.join(LABEL_FILES.values())} found; give the "
                           "RAD-ChestCT folder")
    volumes: dict[str, Path] = {}
    for p in sorted(root.rglob("*.nii*")):
        stem = p.name.split(".nii")[0]
        volumes.setdefault(stem, p)
    result = ImportResult("rad-chestct")
    for split, table in present.items():
        for line, row in read_csv_rows(table, (ID_COLUMN,)):
            acc = row[ID_COLUMN]
            labels: dict[str, int] = {}
            ok = True
            for column, value in row.items():
                if "*" not in column:
                    continue
                name = SHARED_LABELS.get(column.split("*", 1)[0])
                if name is None:
                    continue
                if value not in ("0", "1", "0.0", "1.0"):
                    result.bad.append(BadRow(table, line, f"{acc}: column '{column}': expected "
                                             f"0 or 1, got {value!r}"))
                    ok = False
                    break
                labels[name] = max(labels.get(name, 0), int(float(value)))
            if not ok:
                continue
            if not acc:
                result.bad.append(BadRow(table, line, f"empty {ID_COLUMN}"))
                continue
            image = volumes.get(acc)
            if image is None:
                result.missing.append(BadRow(root / f"{acc}.nii.gz", None,
                                             "volume not on disk (convert the .npz to NIfTI)"))
                continue
            result.rows.append({"study_id": acc, "patient_id": acc,
                                "image": str(image.resolve()), "split": split,
                                "labels": labels, "modality": "CT"})
    result.notes.append(f"labels kept: the {len(SHARED_LABELS)} abnormalities shared with "
                        "CT-RATE, present when any location is")
    from t3d_data.sources.ct_rate import zero_shot_prompts

    prompts = zero_shot_prompts()
    result.sidecars["prompts"] = {n: prompts[n] for n in SHARED_LABELS.values()}
    return result
