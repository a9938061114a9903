"""Tiny synthetic replicas of the public datasets' on-disk layouts, for tests and demos.

``write_replica(dataset, root, n=..., seed=...)`` writes the folder structure, file names and
CSV columns / JSON keys each importer reads (see the importer modules), with a few small
synthetic volumes. Nothing is copied from any dataset: volumes are random ellipsoids, reports
are template sentences. Each replica also contains the pitfalls its importer must handle:

- ``ct-rate``: NIfTI headers without rescale slope/intercept or geometry (stored values are
  HU + 1024; the metadata CSV has ``RescaleIntercept`` -1024 and the spacing), except the last
  train patient's volume, re-written with a complete header and HU values (as CT-RATE's
  ``download_scripts/fix_metadata.py`` leaves a file), which must not be shifted again; patient
  numbers that repeat across the official splits (``train_1`` and ``valid_1``); a scan with two
  reconstructions; an empty ``Impressions_EN``;
- ``bimcv-r``: Spanish reports with English translations, a patient with two sessions;
- ``rad-chestct``: abnormality x location columns, some not shared with CT-RATE;
- ``btcv``: MONAI's ``dataset_0.json`` (24 training + 6 validation cases) and 13 labels;
- ``msd``: Task01-style 4D images (4 MR sequences, channels last) and ``dataset.json``;
- ``brats``: 2023 naming (or ``naming="2021"``), a patient with two timepoints, a case
  without ``seg`` (like the validation data).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["REPLICAS", "write_replica"]

_REPORT_FINDINGS = ("The lungs are clear.", "Small nodule in the right upper lobe.",
                    "Bilateral pleural effusion.", "Cardiomegaly without effusion.")
_REPORT_ES = ("Pulmones sin hallazgos.", "Nódulo pulmonar en el lóbulo superior derecho.",
              "Derrame pleural bilateral.", "Cardiomegalia sin derrame.")


def _body(shape: Sequence[int], rng: np.random.Generator, air: float = -1000.0,
          tissue: float = 40.0) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = (grid**2).sum(0) < 0.55 + 0.1 * rng.random()
    return np.where(inside, tissue, air) + rng.normal(0, 8, tuple(shape))


def _save(path: Path, array: np.ndarray, affine: np.ndarray | None) -> Path:
    """Writes a NIfTI file; ``affine=None`` leaves the header without geometry (codes 0)."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    nib.save(img, str(path))
    return path


def _csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _ct_rate(root: Path, n: int, rng: np.random.Generator, shape: Sequence[int]) -> None:
    from t3d_data.sources.ct_rate import ABNORMALITIES, FILES

    data = root / "dataset"
    meta_cols = ["VolumeName", "Manufacturer", "SeriesDescription", "PatientSex", "PatientAge",
                 "XYSpacing", "Rows", "Columns", "ZSpacing", "RescaleIntercept", "RescaleSlope",
                 "NumberofSlices", "ImagePositionPatient", "ImageOrientationPatient"]
    for split, n_patients in (("train", n), ("valid", max(1, n // 2))):
        folder, reports_csv, meta_csv, labels_csv = FILES[split]
        meta_rows, report_rows, label_rows = [], [], []
        for p in range(1, n_patients + 1):
            recons = 2 if (split == "train" and p == 1) else 1
            for r in range(1, recons + 1):
                name = f"{split}_{p}_a_{r}.nii.gz"
                hu = np.rint(_body(shape, rng)).astype(np.int16)
                stored = (hu + 1024).astype(np.int16)  # DICOM stored values, intercept -1024
                path = data / folder / f"{split}_{p}" / f"{split}_{p}_a" / name
                xy, z = 0.75 + 0.05 * p, 1.5
                origin = [-100.0 - p, -120.0, -300.0 + r]
                if split == "train" and p == n_patients:
                    # re-written as fix_metadata.py does: int16 HU, spacing/origin/direction
                    lps = np.diag([xy, xy, z, 1.0])
                    lps[:3, 3] = origin
                    _save(path, hu, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)
                else:
                    _save(path, stored, None)  # as distributed: no geometry, no scaling
                meta_rows.append([name, "SYNTHETIC", "CHEST", "M", "060Y", f"[{xy}, {xy}]",
                                  shape[1], shape[0], z, -1024, 1, shape[2], str(origin),
                                  "[1, 0, 0, 0, 1, 0]"])
                k = int(rng.integers(len(_REPORT_FINDINGS)))
                impression = "" if (split == "valid" and p == 1) else "No acute findings."
                report_rows.append([name, "Synthetic clinical note.", "Non-contrast chest CT.",
                                    _REPORT_FINDINGS[k], impression])
                label_rows.append([name, *(int(v) for v in rng.random(len(ABNORMALITIES)) < 0.3)])
        _csv(data / meta_csv, meta_cols, meta_rows)
        _csv(data / reports_csv, ["VolumeName", "ClinicalInformation_EN", "Technique_EN",
                                  "Findings_EN", "Impressions_EN"], report_rows)
        _csv(data / labels_csv, ["VolumeName", *ABNORMALITIES], label_rows)


def _bimcv_r(root: Path, n: int, rng: np.random.Generator, shape: Sequence[int]) -> None:
    rows = []
    for p in range(1, n + 1):
        for s in range(1, (2 if p == 1 else 1) + 1):
            name = f"sub-S{p:05d}_ses-E{p:03d}{s:02d}_run-1_bp-chest_ct.nii.gz"
            hu = np.rint(_body(shape, rng)).astype(np.int16)
            _save(root / f"CT{1 + p % 2}" / "ct" / name, hu, np.diag([0.8, 0.8, 1.2, 1.0]))
            k = int(rng.integers(len(_REPORT_ES)))
            rows.append([f"CT{1 + p % 2}/ct/{name}", _REPORT_ES[k], _REPORT_FINDINGS[k]])
    _csv(root / "meta" / "curated_ct_report_path_En.csv", ["path", "Report_es", "Report_en"],
         rows)


def _rad_chestct(root: Path, n: int, rng: np.random.Generator, shape: Sequence[int]) -> None:
    from t3d_data.sources.rad_chestct import ID_COLUMN, LABEL_FILES

    columns = ["nodule*right_lung", "nodule*left_lung", "cardiomegaly*heart",
               "pleural_effusion*right_lung", "mass*right_lung", "catheter_or_port*other"]
    prefix = {"train": "trn", "val": "val", "test": "tst"}
    k = 0
    for split, table in LABEL_FILES.items():
        rows = []
        for _ in range(max(1, n // 3) if split != "test" else n):
            k += 1
            acc = f"{prefix[split]}{k:05d}"
            hu = np.rint(_body(shape, rng)).astype(np.int16)
            _save(root / "volumes" / f"{acc}.nii.gz", hu, np.diag([0.8, 0.8, 0.8, 1.0]))
            rows.append([acc, *(int(v) for v in rng.random(len(columns)) < 0.4)])
        _csv(root / table, [ID_COLUMN, *columns], rows)


def _btcv(root: Path, n: int, rng: np.random.Generator, shape: Sequence[int]) -> None:
    from t3d_data.sources.btcv import SPLIT_FILE, standard_split_json

    split = standard_split_json()
    if n < 30:  # keep the json's proportions: the first n cases of the standard split
        n_train = max(1, round(n * 0.8))
        split["training"] = split["training"][:n_train]
        split["validation"] = split["validation"][:max(1, n - n_train)]
    for entry in split["training"] + split["validation"]:
        hu = _body(shape, rng)
        labels = np.zeros(shape, np.uint8)
        labels[hu > 0] = rng.integers(1, 14)
        labels[: shape[0] // 3][hu[: shape[0] // 3] > 0] = 6  # a "liver"
        affine = np.diag([0.9, 0.9, 2.5, 1.0])
        _save(root / entry["image"], np.rint(hu).astype(np.int16), affine)
        _save(root / entry["label"], labels, affine)
    (root / SPLIT_FILE).write_text(json.dumps(split, indent=4), encoding="utf-8")


def _msd(root: Path, n: int, rng: np.random.Generator, shape: Sequence[int]) -> None:
    task = root
    modality = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    training = []
    for k in range(1, n + 1):
        name = f"BRATS_{k:03d}.nii.gz"
        base = _body(shape, rng, air=0.0, tissue=300.0)
        image = np.stack([base * (1 + 0.2 * c) for c in range(4)], axis=-1).astype(np.float32)
        labels = np.zeros(shape, np.uint8)
        labels[base > 150] = 1
        labels[tuple(s // 2 for s in shape)] = 3
        affine = np.eye(4)
        _save(task / "imagesTr" / name, image, affine)
        _save(task / "labelsTr" / name, labels, affine)
        (task / "imagesTr" / f"._{name}").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {"name": "BRATS", "description": "Gliomas segmentation tumour and oedema in on brain "
            "images", "tensorImageSize": "4D", "modality": modality,
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor",
                       "3": "enhancing tumour"},
            "numTraining": n, "numTest": 1, "training": training,
            "test": ["./imagesTs/BRATS_900.nii.gz"]}
    (task / "dataset.json").write_text(json.dumps(meta, indent=4), encoding="utf-8")


def _brats(root: Path, n: int, rng: np.random.Generator, shape: Sequence[int],
           naming: str = "2023") -> None:
    from t3d_data.sources.brats import _SUFFIX_2021, CHANNELS

    et = 3 if naming == "2023" else 4
    cases = [(p, 0) for p in range(n)] + [(1, 1)]  # patient 1 also at a second timepoint
    for k, (p, t) in enumerate(cases + [(n + 1, 0)]):
        if naming == "2023":
            case = f"BraTS-GLI-{p:05d}-{t:03d}"
            files = {c: f"{case}-{c}.nii.gz" for c in CHANNELS}
            seg = f"{case}-seg.nii.gz"
        else:
            case = f"BraTS2021_{k:05d}"
            files = {c: f"{case}_{_SUFFIX_2021[c]}.nii.gz" for c in CHANNELS}
            seg = f"{case}_seg.nii.gz"
        folder = root / "TrainingData" / case
        base = _body(shape, rng, air=0.0, tissue=500.0)
        affine = np.diag([-1.0, -1.0, 1.0, 1.0])
        for c, name in files.items():
            _save(folder / name, (base * (1 + 0.1 * CHANNELS.index(c))).astype(np.float32), affine)
        if k < len(cases):  # the last case has no seg (validation-like)
            labels = np.zeros(shape, np.uint8)
            labels[base > 250] = 2
            labels[base > 520] = 1
            labels[tuple(s // 2 for s in shape)] = et
            _save(folder / seg, labels, affine)


REPLICAS: dict[str, Callable[..., None]] = {
    "ct-rate": _ct_rate, "bimcv-r": _bimcv_r, "rad-chestct": _rad_chestct, "btcv": _btcv,
    "msd": _msd, "brats": _brats,
}


def write_replica(dataset: str, root: str | Path, *, n: int = 4, seed: int = 0,
                  shape: Sequence[int] = (24, 24, 16), **options: Any) -> Path:
    """Writes a tiny synthetic replica of ``dataset``'s layout into ``root``.

    Args:
        dataset: a name of :data:`t3d_data.sources.DATASETS`.
        root: folder to write (created).
        n: patients (cases for btcv/msd; btcv writes its full 30-case split when ``n >= 30``).
        seed: seed of the volumes, reports and labels.
        shape: volume size in voxels.
        options: dataset-specific (``naming="2021"`` for brats).

    Returns:
        ``root``, the folder to give ``t3d-data import``.
    """
    if dataset not in REPLICAS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(REPLICAS)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    REPLICAS[dataset](root, n, np.random.default_rng(seed), tuple(shape), **options)
    return root
