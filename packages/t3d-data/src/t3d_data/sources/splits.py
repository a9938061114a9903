"""Patient-level split assignment for importers of datasets without an official split."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from t3d_data.manifest import StudyRecord, patient_split

__all__ = ["assign_patient_splits"]


def assign_patient_splits(rows: list[dict[str, Any]], fractions: Mapping[str, float],
                          seed: int) -> None:
    """Sets ``split`` of rows that have none, patient by patient (:func:`t3d_data.patient_split`,
    so a patient's studies always share one split); rows with a split keep it."""
    if not rows:
        return
    records = [StudyRecord(study_id=r["study_id"], patient_id=r["patient_id"], image=r["image"],
                           split=r.get("split")) for r in rows]
    for row, rec in zip(rows, patient_split(records, fractions, seed), strict=True):
        row["split"] = rec.split
