"""Phantom CT-report data: deterministic synthetic chest-abdomen CTs with matching reports.

The project's embedded default data (no real corpus offline). Findings are sampled once and both
rendered into the volume (HU + label map) and stated in the report; see ``docs`` of each module:
``anatomy`` (geometry, RAS+), ``findings`` (attributes, lesions), ``reports`` (templates, twins,
zero-shot prompts), ``study`` (one study), ``dataset`` (NIfTI + manifest writer) and ``tasks`` (the phantom's
evaluation tasks: a :class:`t3d_data.tasks.DatasetTasks` provider).
"""

from __future__ import annotations

from t3d_data.phantom.anatomy import LESION_LABELS, ORGAN_LABELS
from t3d_data.phantom.dataset import FINDINGS_SIDECAR, generate_phantom_dataset
from t3d_data.phantom.findings import FINDINGS, sample_findings
from t3d_data.phantom.reports import (
    SHORT_NORMAL_REPORT,
    TEMPLATES,
    ZERO_SHOT_PROMPTS,
    render_report,
    twin_findings,
    twin_report,
)
from t3d_data.phantom.study import PhantomStudy, generate_study
from t3d_data.phantom.tasks import (
    PHANTOM_SEG_CLASSES,
    PHANTOM_TASKS,
    PhantomTwins,
    find_findings_sidecar,
)

#: Every label value of the label maps (organs, then lesions).
LABELS: dict[str, int] = {**ORGAN_LABELS, **LESION_LABELS}

__all__ = [
    "FINDINGS",
    "FINDINGS_SIDECAR",
    "LABELS",
    "LESION_LABELS",
    "ORGAN_LABELS",
    "PHANTOM_SEG_CLASSES",
    "PHANTOM_TASKS",
    "SHORT_NORMAL_REPORT",
    "TEMPLATES",
    "ZERO_SHOT_PROMPTS",
    "PhantomStudy",
    "PhantomTwins",
    "find_findings_sidecar",
    "generate_phantom_dataset",
    "generate_study",
    "render_report",
    "sample_findings",
    "twin_findings",
    "twin_report",
]
