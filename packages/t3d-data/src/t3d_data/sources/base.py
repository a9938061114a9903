"""What every importer shares: the result type, bad-row bookkeeping, CSV reading, writing.

An importer turns a dataset's own files, exactly as distributed, into manifest rows (dicts that
:class:`t3d_data.StudyRecord` validates) without copying volumes. Rows it cannot use are not
dropped silently: each is a :class:`BadRow` naming the file, the line and the reason, counted
in the summary (``t3d-data import`` prints them).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from t3d_data.errors import T3DDataError

__all__ = ["BadRow", "ImportError_", "ImportResult", "read_csv_rows", "write_json_atomic",
           "write_manifest"]


class ImportError_(T3DDataError, ValueError):  # noqa: N801 - ImportError is a builtin
    """The dataset folder does not have the layout the importer expects (names the fix)."""


@dataclass(frozen=True)
class BadRow:
    """One row or file an importer could not use.

    Attributes:
        file: the dataset file (or volume) concerned.
        line: 1-based line in ``file`` (``None`` for a file as a whole).
        reason: what is wrong and, where there is one, the fix.
    """

    file: Path
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.file} line {self.line}" if self.line is not None else str(self.file)
        return f"{where}: {self.reason}"


@dataclass
class ImportResult:
    """What one import produced.

    Attributes:
        dataset: the importer's name.
        rows: manifest rows, in a deterministic order.
        bad: rows or files that could not be used.
        missing: rows whose volume is not on disk (e.g. a partial download), counted apart.
        sidecars: extra files to write next to the manifest: suffix -> JSON object, e.g.
            ``{"prompts": {...}}`` becomes ``<manifest stem>.prompts.json``.
        notes: one-line facts for the summary (e.g. the split mapping used).
    """

    dataset: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)
    missing: list[BadRow] = field(default_factory=list)
    sidecars: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Studies per split (``"none"`` for unassigned)."""
        out: dict[str, int] = {}
        for r in self.rows:
            key = r.get("split") or "none"
            out[key] = out.get(key, 0) + 1
        return out

    def summary(self) -> str:
        """One line: studies, patients, splits, bad and missing rows."""
        patients = len({r["patient_id"] for r in self.rows})
        splits = ", ".join(f"{k} {v}" for k, v in sorted(self.counts().items()))
        return (f"{self.dataset}: {len(self.rows)} studies of {patients} patients ({splits}); "
                f"{len(self.bad)} bad rows, {len(self.missing)} rows without a volume on disk")


def read_csv_rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yields ``(line number, row)`` of a CSV with a header row (UTF-8, BOM tolerated).

    Raises:
        ImportError_: the file is missing or lacks a required column (naming both).
    """
    if not path.is_file():
        raise ImportError_(f"{path}: not found; is the dataset folder complete?")
    with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        lacking = [c for c in required if c not in header]
        if lacking:
            raise ImportError_(f"{path}: missing column(s) {', '.join(lacking)} (has: "
                               f"{', '.join(header) or 'no header row'})")
        start = 2
        for row in reader:
            lineno, start = start, reader.line_num + 1
            yield lineno, {k: (v or "").strip() for k, v in row.items() if k is not None}


def write_json_atomic(path: Path, obj: Any) -> None:
    """Writes JSON to a temporary file and renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Writes JSONL rows atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
