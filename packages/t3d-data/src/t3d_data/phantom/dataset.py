"""Phantom dataset writer: NIfTI images and masks, ``manifest.jsonl`` and a findings sidecar.

Splits are by patient (~70/10/20 train/val/test); test reports use the reserved paraphrases.
Every file is written to a temporary name and moved into place with ``os.replace``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from t3d_data.phantom.study import PhantomStudy, build_study

__all__ = ["FINDINGS_SIDECAR", "generate_phantom_dataset", "patient_plan"]

#: Sidecar next to the manifest: per study the findings, report seed and template pool.
FINDINGS_SIDECAR = "phantom_findings.jsonl"
P_FOLLOW_UP = 0.15


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    _atomic(path, lambda p: nib.save(img, p))


def patient_plan(n_studies: int, seed: int) -> list[tuple[int, str]]:
    """Patient index and split of every study (a few patients get a follow-up study).

    Args:
        n_studies: number of studies.
        seed: dataset seed.

    Returns:
        ``[(patient_index, split), ...]`` per study.
    """
    rng = np.random.default_rng([seed, 7919])
    patients: list[int] = []
    for i in range(n_studies):
        follow = i > 0 and patients.count(patients[-1]) == 1 and rng.uniform() < P_FOLLOW_UP
        patients.append(patients[-1] if follow else (patients[-1] + 1 if patients else 0))
    n_pat = patients[-1] + 1
    order = rng.permutation(n_pat)
    n_test = int(round(0.2 * n_pat))
    n_val = int(round(0.1 * n_pat))
    split = {}
    for rank, p in enumerate(order):
        split[int(p)] = "test" if rank < n_test else ("val" if rank < n_test + n_val else "train")
    return [(p, split[p]) for p in patients]


def generate_phantom_dataset(
    out_dir: str | Path,
    n_studies: int = 24,
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    progress: bool = True,
) -> Path:
    """Write a deterministic synthetic CT-report dataset and return its manifest path.

    Layout: ``images/<study_id>.nii.gz`` (int16 HU, RAS), ``masks/<study_id>.nii.gz`` (uint8
    labels), ``manifest.jsonl`` (``study_id, patient_id, image, report, split, labels, mask``;
    paths relative to ``out_dir``) and :data:`FINDINGS_SIDECAR`. The same seed gives the same
    arrays and manifest.

    Args:
        out_dir: output folder (created).
        n_studies: number of studies (>= 1).
        seed: dataset seed.
        shape: fixed ``(X, Y, Z)`` for every study; default varies per study.
        progress: show a tqdm progress bar.

    Returns:
        ``out_dir / "manifest.jsonl"``.

    Raises:
        ValueError: if ``n_studies < 1`` or the shape is invalid.
    """
    if isinstance(n_studies, bool) or not isinstance(n_studies, int) or n_studies < 1:
        raise ValueError(f"n_studies must be an integer >= 1; got {n_studies!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    side: list[str] = []
    for i, (patient, split) in enumerate(tqdm(patient_plan(n_studies, seed), desc="phantom",
                                              unit="study", disable=not progress)):
        anat_rng = np.random.default_rng([seed, patient, 0])
        find_rng = np.random.default_rng([seed, i, 1])
        study: PhantomStudy = build_study(anat_rng, find_rng, shape, None, reserved=split == "test")
        sid, pid = f"phantom_{i:04d}", f"patient_{patient:04d}"
        image, mask = f"images/{sid}.nii.gz", f"masks/{sid}.nii.gz"
        _save_nifti(out / image, study.volume, study.affine)
        _save_nifti(out / mask, study.label_map, study.affine)
        record: dict[str, Any] = {"study_id": sid, "patient_id": pid, "image": image,
                                  "report": study.report, "split": split, "labels": study.labels,
                                  "mask": mask}
        lines.append(json.dumps(record))
        side.append(json.dumps({"study_id": sid, "findings": study.findings,
                                "report_seed": study.report_seed, "reserved": study.reserved,
                                "short_normal": study.short_normal, "anatomy": study.anatomy}))
    manifest = out / "manifest.jsonl"
    _atomic(out / FINDINGS_SIDECAR, lambda p: p.write_text("\n".join(side) + "\n", encoding="utf-8"))
    _atomic(manifest, lambda p: p.write_text("\n".join(lines) + "\n", encoding="utf-8"))
    return manifest
