"""BraTS (RSNA-ASNR-MICCAI brain tumour segmentation): 4 co-registered MRI sequences and a
tumour label map per case.

Layouts read (one folder per case, anywhere under ROOT)::

    BraTS 2023+  BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz
                 (also -MEN-, -MET-, -PED-, -SSA- cohorts; <patient>-<timepoint>)
    BraTS 2021   BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz

What the importer gets right (docs/datasets.md):

- **multi-channel image records**: ``image`` lists the four files in one fixed channel order,
  ``channels = ["t1n", "t1c", "t2w", "t2f"]`` (2021's ``t1, t1ce, t2, flair`` are the same
  sequences and get the same names), ``modality: "MR"``, ``mask`` the ``seg`` file;
- **label values**: 2023+ labels are 1 NCR, 2 ED (SNFH), 3 ET; 2021 uses 4 for ET; written to
  ``<manifest stem>.classes.json`` for the naming in use;
- **ids and splits**: ``BraTS-GLI-00012-001`` is timepoint 001 of patient ``BraTS-GLI-00012``;
  the public validation data has no ``seg`` (such cases are reported, not imported); a seeded
  patient-level 80/20 train/val split is drawn, so the timepoints of a patient share a split.
"""

from __future__ import annotations

import re
from pathlib import Path

from t3d_data.sources.base import BadRow, ImportError_, ImportResult
from t3d_data.sources.splits import assign_patient_splits

__all__ = ["CHANNELS", "import_brats"]

CHANNELS = ("t1n", "t1c", "t2w", "t2f")
_SUFFIX_2021 = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}
_CASE_2023 = re.compile(r"(BraTS-[A-Z]+-\d+)-(\d+)")
_CASE_2021 = re.compile(r"BraTS20\d\d_(\d+)")
CLASSES = {"2023": {"NCR": [1], "ED": [2], "ET": [3]},
           "2021": {"NCR": [1], "ED": [2], "ET": [4]}}


def _files(case_dir: Path) -> tuple[str, str, dict[str, Path], Path] | None:
    """(naming, patient id, channel files, seg file) of a case folder, or None."""
    name = case_dir.name
    m = _CASE_2023.fullmatch(name)
    if m is not None:
        chan = {c: case_dir / f"{name}-{c}.nii.gz" for c in CHANNELS}
        return "2023", m.group(1), chan, case_dir / f"{name}-seg.nii.gz"
    m = _CASE_2021.fullmatch(name)
    if m is not None:
        chan = {c: case_dir / f"{name}_{_SUFFIX_2021[c]}.nii.gz" for c in CHANNELS}
        return "2021", name, chan, case_dir / f"{name}_seg.nii.gz"
    return None


def import_brats(root: str | Path, *, seed: int = 0, val_fraction: float = 0.2) -> ImportResult:
    """Imports BraTS case folders found under ``root`` (see the module docstring).

    Raises:
        ImportError_: no case folder of either naming, or both namings mixed.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    root = Path(root)
    cases = sorted(p for p in root.rglob("BraTS*") if p.is_dir() and _files(p) is not None)
    if not cases:
        raise ImportError_(f"{root}: no BraTS case folders (BraTS-GLI-00000-000/ or "
                           "BraTS2021_00000/) found")
    result = ImportResult("brats")
    namings = set()
    for case in cases:
        naming, patient, chan, seg = _files(case)  # type: ignore[misc]
        namings.add(naming)
        lacking = [c for c, p in chan.items() if not p.is_file()]
        if lacking:
            result.bad.append(BadRow(case, None, f"missing sequence(s) {', '.join(lacking)} "
                                     f"(expected {chan[lacking[0]].name})"))
            continue
        if not seg.is_file():
            result.missing.append(BadRow(case, None, f"no {seg.name} (validation data has no "
                                         "labels); not imported"))
            continue
        result.rows.append({"study_id": case.name, "patient_id": patient,
                            "image": [str(chan[c].resolve()) for c in CHANNELS],
                            "channels": list(CHANNELS), "modality": "MR",
                            "mask": str(seg.resolve()),
                            "meta": {"brats": {"naming": naming}}})
    if len(namings) > 1:
        raise ImportError_(f"{root}: mixes BraTS 2021 and 2023 case folders, whose ET label "
                           "values differ (4 vs 3); import each release into its own manifest")
    assign_patient_splits(result.rows, {"train": 1 - val_fraction, "val": val_fraction}, seed)
    naming = namings.pop()
    result.sidecars["classes"] = CLASSES[naming]
    result.notes.append(f"BraTS {naming} naming; channels {list(CHANNELS)}; patient-level "
                        f"{1 - val_fraction:.0%}/{val_fraction:.0%} train/val, seed {seed}")
    return result
