"""The phantom's evaluation tasks (a :class:`t3d_data.tasks.DatasetTasks` provider, ``"phantom"``).

- Zero-shot prompts: :data:`t3d_data.phantom.ZERO_SHOT_PROMPTS`.
- Segmentation classes: :data:`PHANTOM_SEG_CLASSES`, the label values merged into five organs.
- Report twins: from the findings sidecar (:data:`FINDINGS_SIDECAR`, written next to the
  manifest by :func:`generate_phantom_dataset`), each study's findings re-rendered with its own
  template seed and pool after :func:`twin_findings` changed one attribute.
- Detection: a store is a phantom store when its sidecar is found (:func:`find_findings_sidecar`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from t3d_data.phantom.anatomy import LESION_LABELS, ORGAN_LABELS
from t3d_data.phantom.dataset import FINDINGS_SIDECAR
from t3d_data.phantom.reports import ZERO_SHOT_PROMPTS, render_report, twin_findings
from t3d_data.tasks import DatasetTasks, TasksError

__all__ = ["PHANTOM_SEG_CLASSES", "PHANTOM_TASKS", "PhantomTwins", "find_findings_sidecar"]

_LABELS = {**ORGAN_LABELS, **LESION_LABELS}

#: Label values merged into the segmentation benchmark's classes: organs keep the lesions
#: inside them (as BTCV organ contours do); body wall, spine, ribs, aorta and pleural fluid
#: count as background.
PHANTOM_SEG_CLASSES: dict[str, list[int]] = {
    name: [_LABELS[p] for p in parts] for name, parts in {
        "lungs": ("lung_right", "lung_left", "lung_nodule"),
        "heart": ("heart",),
        "liver": ("liver", "liver_lesion"),
        "spleen": ("spleen",),
        "kidneys": ("kidney_right", "kidney_left", "kidney_cyst"),
    }.items()
}


def _candidates(store: Path) -> list[Path]:
    out = [store / FINDINGS_SIDECAR, store.parent / FINDINGS_SIDECAR,
           *sorted(store.parent.glob(f"*/{FINDINGS_SIDECAR}"))]
    index = store / "index.json"
    if index.is_file():  # next to the manifest the studies were prepared from (images/X.nii.gz)
        try:
            studies = json.loads(index.read_text(encoding="utf-8")).get("studies", [])
        except (OSError, ValueError, AttributeError):
            studies = []
        if studies and isinstance(studies[0], dict) and studies[0].get("source"):
            src = Path(studies[0]["source"])
            out += [src.parent.parent / FINDINGS_SIDECAR, src.parent / FINDINGS_SIDECAR]
    return out


def find_findings_sidecar(store: str | Path, explicit: str | Path | None = None) -> Path | None:
    """The phantom findings sidecar of a store: ``explicit``, else the first found of
    ``STORE/``, ``STORE/../``, ``STORE/../*/`` (the demo layout ``ROOT/phantom`` +
    ``ROOT/store``) and the folder of the manifest the store's studies came from; else ``None``.

    Raises:
        TasksError: ``explicit`` is not a file.
    """
    if explicit is not None:
        if not Path(explicit).is_file():
            raise TasksError(f"findings: {explicit} does not exist; pass the phantom findings "
                             f"sidecar ({FINDINGS_SIDECAR}) or leave it out to find it next to "
                             "the store")
        return Path(explicit)
    for cand in _candidates(Path(store)):
        if cand.is_file():
            return cand
    return None


class PhantomTwins:
    """:class:`t3d_data.tasks.ReportTwins` of the studies of a findings sidecar.

    Args:
        sidecar: the ``phantom_findings.jsonl`` path.

    Raises:
        TasksError: a line of the sidecar is not a JSON record with ``study_id`` and
            ``findings``.
    """

    def __init__(self, sidecar: str | Path) -> None:
        self.path = Path(sidecar)
        self.records: dict[str, dict[str, Any]] = {}
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and isinstance(rec.get("findings"), dict)
            except ValueError:
                ok = False
            if not ok or not isinstance(rec.get("study_id"), str):
                raise TasksError(f"{self.path} line {n}: not a phantom findings record (a JSON "
                                 "object with 'study_id' and 'findings')")
            self.records[rec["study_id"]] = rec

    def twin(self, study_id: str, rng: np.random.Generator) -> tuple[str, str] | None:
        """``(twin report, changed attribute)``; ``size_mm`` is reported as ``"size"``."""
        rec = self.records.get(study_id)
        if rec is None:
            return None
        twin, change = twin_findings(rec["findings"], rng)
        text = render_report(twin, seed=rec.get("report_seed", 0),
                             reserved=rec.get("reserved", False))
        attr = "size" if change["attribute"] == "size_mm" else change["attribute"]
        return text, attr


def _phantom_twins(store: Path, sidecar: Path | None) -> PhantomTwins | None:
    path = find_findings_sidecar(store, sidecar)
    return PhantomTwins(path) if path is not None else None


PHANTOM_TASKS = DatasetTasks(
    name="phantom",
    zero_shot_prompts=ZERO_SHOT_PROMPTS,
    seg_classes=PHANTOM_SEG_CLASSES,
    twins=_phantom_twins,
    detect=lambda store: find_findings_sidecar(store) is not None,
    description="the synthetic chest-abdomen phantom (t3d-data phantom / demo)",
)
