"""CT-RATE (Hamamci et al., ``ibrahimhamamci/CT-RATE`` on the Hugging Face hub).

Layout as distributed (paths under the dataset repository's root)::

    dataset/train/train_<patient>/train_<patient>_<scan>/train_<patient>_<scan>_<recon>.nii.gz
    dataset/valid/valid_<patient>/valid_<patient>_<scan>/valid_<patient>_<scan>_<recon>.nii.gz
    dataset/radiology_text_reports/{train,validation}_reports.csv
        VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN
    dataset/metadata/{train,validation}_metadata.csv
        VolumeName, ..., XYSpacing ("[0.75, 0.75]"), ZSpacing, RescaleSlope, RescaleIntercept,
        ImagePositionPatient, ImageOrientationPatient, ...
    dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv
        VolumeName, then the 18 abnormalities (0/1)

What the importer gets right (docs/datasets.md):

- **report text**: ``"FINDINGS: <Findings_EN>\\n\\nIMPRESSION: <Impressions_EN>"``, the two
  fields CT-CLIP trains on, in that order; an empty, NaN or ``"Not given."`` field is left out;
  ``ClinicalInformation_EN`` and ``Technique_EN`` go to ``meta["ct_rate"]``, not into the text;
- **HU and geometry**: the original volumes' NIfTI headers lack rescale slope/intercept,
  spacing, origin and direction; the metadata row's values go to ``meta["header"]``, which the
  reader applies only where the header lacks them (:mod:`t3d_data.header`);
- **ids**: ``train_12_a_2.nii.gz`` -> patient ``train_12`` (patient numbers restart in each
  official split: ``valid_12`` is another person), scan ``train_12_a`` and study (one
  reconstruction) ``train_12_a_2``;
- **splits**: the official ``valid`` set becomes ``test`` (the set papers report on); a seeded,
  patient-level ``val_fraction`` of the official ``train`` patients becomes ``val`` (for model
  and threshold selection), the rest ``train``; no patient crosses splits.
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from t3d_data.sources.base import BadRow, ImportError_, ImportResult, read_csv_rows

__all__ = ["ABNORMALITIES", "FILES", "import_ct_rate", "parse_volume_name", "report_text"]

#: The 18 abnormalities of ``multi_abnormality_labels`` (column order of the CSVs).
ABNORMALITIES = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
    "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela",
    "Pleural effusion", "Mosaic attenuation pattern", "Peribronchial thickening",
    "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
)

#: official split -> (volume folder, reports CSV, metadata CSV, labels CSV), under ``dataset/``.
FILES = {
    "train": ("train", "radiology_text_reports/train_reports.csv",
              "metadata/train_metadata.csv", "multi_abnormality_labels/train_predicted_labels.csv"),
    "valid": ("valid", "radiology_text_reports/validation_reports.csv",
              "metadata/validation_metadata.csv",
              "multi_abnormality_labels/valid_predicted_labels.csv"),
}
REPORT_COLUMNS = ("VolumeName", "Findings_EN", "Impressions_EN")
METADATA_COLUMNS = ("VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing")
_NAME = re.compile(r"(train|valid)_(\d+)_([a-z]+)_(\d+)\.nii(?:\.gz)?")
_EMPTY = {"", "nan", "none", "not given.", "not given"}


def parse_volume_name(name: str) -> dict[str, Any] | None:
    """``train_12_a_2.nii.gz`` -> ids, or ``None`` for a name of another form.

    >>> parse_volume_name("valid_7_b_1.nii.gz")["patient_id"]
    'valid_7'
    """
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    split, patient, scan, recon = m.groups()
    return {"official_split": split, "patient_id": f"{split}_{patient}",
            "scan_id": f"{split}_{patient}_{scan}", "study_id": f"{split}_{patient}_{scan}_{recon}",
            "reconstruction": int(recon)}


def _field(value: str | None) -> str:
    value = (value or "").strip()
    return "" if value.lower() in _EMPTY else value


def report_text(findings: str | None, impressions: str | None) -> str:
    """The report as the importer assembles it (empty when both fields are empty).

    >>> report_text("Lungs clear.", "Normal.")
    'FINDINGS: Lungs clear.\\n\\nIMPRESSION: Normal.'
    """
    parts = []
    if _field(findings):
        parts.append(f"FINDINGS: {_field(findings)}")
    if _field(impressions):
        parts.append(f"IMPRESSION: {_field(impressions)}")
    return "\n\n".join(parts)


def _floats(value: str, n: int) -> list[float]:
    """Parses ``"[0.75, 0.75]"``-style cells (also ``"0.75"`` for n == 1)."""
    parsed = ast.literal_eval(value) if value.strip().startswith(("[", "(")) else [float(value)]
    out = [float(v) for v in parsed]
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise ValueError(f"expected {n} finite number(s), got {value!r}")
    return out


def _header(row: dict[str, str]) -> dict[str, Any]:
    """``meta["header"]`` from a metadata row (ValueError names the column)."""
    out: dict[str, Any] = {}
    for column, key in (("RescaleSlope", "rescale_slope"), ("RescaleIntercept",
                                                            "rescale_intercept")):
        try:
            out[key] = _floats(row[column], 1)[0]
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"column {column}: {err}") from None
    try:
        xy = _floats(row["XYSpacing"], 2)
        z = _floats(row["ZSpacing"], 1)[0]
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"column XYSpacing/ZSpacing: {err}") from None
    out["spacing"] = [xy[0], xy[1], z]
    for column, key, n in (("ImageOrientationPatient", "orientation_lps", 6),
                           ("ImagePositionPatient", "origin_lps", 3)):
        if _field(row.get(column)):
            try:
                out[key] = _floats(row[column], n)
            except (ValueError, SyntaxError) as err:
                raise ValueError(f"column {column}: {err}") from None
    return out


def _labels(row: dict[str, str], path: Path, line: int, bad: list[BadRow]) -> dict[str, int] | None:
    labels = {}
    for name in ABNORMALITIES:
        value = row.get(name, "")
        if value == "":
            continue
        try:
            v = float(value)
        except ValueError:
            v = math.nan
        if v not in (0.0, 1.0):
            bad.append(BadRow(path, line, f"column '{name}': expected 0 or 1, got {value!r}"))
            return None
        labels[name] = int(v)
    return labels


def _dataset_dir(root: Path) -> Path:
    for candidate in (root / "dataset", root):
        if (candidate / "radiology_text_reports").is_dir():
            return candidate
    raise ImportError_(f"{root}: no dataset/radiology_text_reports folder; give the CT-RATE "
                       "download folder (the one holding dataset/)")


def import_ct_rate(root: str | Path, *, val_fraction: float = 0.1, seed: int = 0
                   ) -> ImportResult:
    """Imports a CT-RATE download folder (see the module docstring).

    Args:
        root: the folder holding ``dataset/`` (or ``dataset/`` itself).
        val_fraction: fraction of the official-train patients that become ``val``.
        seed: seed of that patient-level draw.

    Raises:
        ImportError_: a CSV or folder of the layout is missing (naming it).
        ValueError: ``val_fraction`` outside [0, 1).
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    data = _dataset_dir(Path(root))
    result = ImportResult("ct-rate")
    present = [s for s, (folder, reports, *_) in FILES.items() if (data / reports).is_file()]
    if not present:
        raise ImportError_(f"{data}: neither {FILES['train'][1]} nor {FILES['valid'][1]} found")
    for split in present:
        folder, reports_csv, meta_csv, labels_csv = FILES[split]
        meta_path, labels_path = data / meta_csv, data / labels_csv
        metadata = {r["VolumeName"]: (n, r) for n, r in read_csv_rows(meta_path, METADATA_COLUMNS)}
        labels: dict[str, tuple[int, dict[str, str]]] = {}
        if labels_path.is_file():
            labels = {r["VolumeName"]: (n, r)
                      for n, r in read_csv_rows(labels_path, ("VolumeName", *ABNORMALITIES))}
        else:
            result.notes.append(f"{labels_path} not found: {split} studies have no labels")
        reports_path = data / reports_csv
        unlabelled: list[str] = []
        rows = read_csv_rows(reports_path, REPORT_COLUMNS)
        for line, row in tqdm(rows, desc=f"ct-rate {split}", unit="row", disable=None):
            name = row["VolumeName"]
            ids = parse_volume_name(name)
            if ids is None or ids["official_split"] != split:
                result.bad.append(BadRow(reports_path, line, f"VolumeName {name!r} is not of the "
                                         f"form {split}_<patient>_<scan>_<reconstruction>.nii.gz"))
                continue
            text = report_text(row.get("Findings_EN"), row.get("Impressions_EN"))
            if not text:
                result.bad.append(BadRow(reports_path, line, f"{name}: Findings_EN and "
                                         "Impressions_EN are both empty"))
                continue
            if name not in metadata:
                result.bad.append(BadRow(reports_path, line, f"{name}: no row in {meta_path.name}"
                                         " (its rescale slope/intercept and spacing are needed)"))
                continue
            meta_line, meta_row = metadata[name]
            try:
                header = _header(meta_row)
            except ValueError as err:
                result.bad.append(BadRow(meta_path, meta_line, f"{name}: {err}"))
                continue
            study_labels: dict[str, int] = {}
            if name in labels:
                lab_line, lab_row = labels[name]
                parsed = _labels(lab_row, labels_path, lab_line, result.bad)
                if parsed is None:
                    continue
                study_labels = parsed
            elif labels:
                unlabelled.append(name)
            image = data / folder / ids["patient_id"] / ids["scan_id"] / name
            if not image.is_file():
                result.missing.append(BadRow(image, None, "volume not on disk"))
                continue
            result.rows.append({
                "study_id": ids["study_id"], "patient_id": ids["patient_id"],
                "image": str(image.resolve()), "report": text,
                "split": "test" if split == "valid" else "train", "labels": study_labels,
                "modality": "CT", "language": "en",
                "meta": {"header": header, "ct_rate": {
                    "official_split": split, "scan_id": ids["scan_id"],
                    "reconstruction": ids["reconstruction"], "volume_name": name,
                    "clinical_information": _field(row.get("ClinicalInformation_EN")),
                    "technique": _field(row.get("Technique_EN"))}},
            })
        if unlabelled:
            result.notes.append(f"{len(unlabelled)} {split} studies have no row in "
                                f"{labels_path.name} and are kept without labels (e.g. "
                                f"{unlabelled[0]})")
    _carve_val(result.rows, val_fraction, seed)
    result.notes.append(f"splits: official valid -> test; {val_fraction:.0%} of official-train "
                        f"patients -> val (seed {seed}), the rest -> train")
    result.sidecars["prompts"] = zero_shot_prompts()
    return result


def _carve_val(rows: list[dict[str, Any]], fraction: float, seed: int) -> None:
    patients = sorted({r["patient_id"] for r in rows if r["split"] == "train"})
    n_val = round(fraction * len(patients))
    if n_val == 0:
        return
    order = np.random.default_rng(seed).permutation(len(patients))
    val = {patients[i] for i in order[:n_val]}
    for r in rows:
        if r["patient_id"] in val:
            r["split"] = "val"


def zero_shot_prompts() -> dict[str, dict[str, list[str]]]:
    """CT-CLIP's zero-shot prompt pair per abnormality (``"<finding> is present."`` vs
    ``"<finding> is not present."``, scripts/zero_shot.py of the CT-CLIP repository since its
    July 2025 revision; earlier revisions used ``"<finding>."`` / ``"not <finding>."``), in the
    :class:`t3d_data.DatasetTasks` ``zero_shot_prompts`` format."""
    return {name: {"positive": [f"{name} is present."], "negative": [f"{name} is not present."]}
            for name in ABNORMALITIES}
