"""Exceptions raised by t3d_data, one base class so tools can catch bad input in one place.

Every message names the culprit (file, line, field or study) and, where there is one, the fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "T3DDataError",
    "ManifestError",
    "ReportError",
    "VolumeReadError",
    "PrepareAborted",
    "PrepareWorkerError",
    "StoreError",
    "StudyLoadError",
]


class T3DDataError(Exception):
    """Base class of every error caused by bad input data (not by a bug)."""


class ManifestError(T3DDataError, ValueError):
    """The manifest is invalid; the message lists every error of the file, one per line.

    Attributes:
        errors: the individual messages, e.g.
            ``"studies.jsonl line 17: field 'report': empty text (study 'ct_0042')"``.
    """

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        head = f"{len(self.errors)} error(s) in manifest:" if len(self.errors) > 1 else ""
        super().__init__("\n".join([head, *self.errors]) if head else self.errors[0])


class ReportError(T3DDataError, ValueError):
    """A report is empty or cannot be read."""


class VolumeReadError(T3DDataError, OSError):
    """A volume (NIfTI / DICOM series) or label map cannot be read safely."""


class StoreError(T3DDataError, OSError):
    """A prepared store is missing or inconsistent."""


class PrepareAborted(T3DDataError, RuntimeError):
    """``prepare`` tried every study and failed: too many are bad, or none is usable.

    The good studies stay prepared in the store (its index names them); ``quarantine.jsonl``
    in the store lists every bad one with its reason.

    Attributes:
        prepared: studies written in this run.
        skipped: studies already present with the same source hash.
        quarantined: bad studies (see ``quarantine.jsonl`` in the store).
        total: studies in the manifest.
        bad: ``(study_id, reason)`` of every bad study.
        quarantine: path of ``quarantine.jsonl`` (``None`` when not given).
    """

    def __init__(self, prepared: int, skipped: int, quarantined: int, total: int, limit: float,
                 *, bad: Sequence[tuple[str, str]] = (), quarantine: str | Path | None = None,
                 store: str | Path | None = None):
        self.prepared, self.skipped, self.quarantined, self.total = (
            prepared, skipped, quarantined, total)
        self.bad = list(bad)
        self.quarantine = Path(quarantine) if quarantine is not None else None
        ids = ", ".join(f"'{sid}'" for sid, _ in self.bad[:10])
        if len(self.bad) > 10:
            ids += f" and {len(self.bad) - 10} more"
        where = f"the reasons are in {self.quarantine}" if self.quarantine else (
            "see quarantine.jsonl in the store for the reasons")
        if prepared + skipped == 0:
            name = f"store {store}" if store is not None else "the store"
            super().__init__(
                f"prepare failed: {name} has 0 usable studies: all {total} studies of the "
                f"manifest are bad{': ' + ids if ids else ''}; {where}; fix the inputs.")
            return
        allowed = math.floor(limit * total + 1e-9)
        super().__init__(
            f"prepare aborted: {quarantined} of {total} studies are bad, more than "
            f"max_bad_fraction={limit:g} allows ({allowed}){': ' + ids if ids else ''}. "
            f"The {prepared + skipped} good studies are prepared ({prepared} written, {skipped} "
            f"unchanged); {where}; fix the inputs or raise --max-bad-fraction.")


class PrepareWorkerError(T3DDataError, RuntimeError):
    """A ``prepare --workers`` process died (e.g. killed for memory) while studies were in flight.

    The studies finished before stay in the index; a rerun resumes.

    Attributes:
        studies: the studies that were running or queued when it died.
    """

    def __init__(self, studies: Sequence[str], workers: int):
        self.studies = list(studies)
        shown = ", ".join(f"'{s}'" for s in self.studies[:8])
        if len(self.studies) > 8:
            shown += f" and {len(self.studies) - 8} more"
        super().__init__(
            f"prepare stopped: a worker process died (killed, e.g. for memory, or crashed) while "
            f"one of these studies was in flight: {shown}; the studies finished before are in "
            f"the index: rerun to resume, with fewer than --workers {workers} (each worker holds "
            "one whole volume in memory) or a lower --max-bytes")


class StudyLoadError(T3DDataError, RuntimeError):
    """A prepared study could not be read at training time (the loop counts and skips these).

    Takes a single message argument so that a DataLoader worker can re-raise it in the main
    process with its type intact.

    Attributes:
        study_id: the failing study (``None`` after a re-raise from a worker).
    """

    def __init__(self, message: str, study_id: str | None = None):
        self.study_id = study_id
        super().__init__(message)
