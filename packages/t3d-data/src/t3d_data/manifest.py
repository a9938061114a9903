"""Study manifest (JSONL or CSV): validated records pointing at volumes and their reports.

Validation is exhaustive: ``load_manifest`` reports every error of the file at once, each naming
the file, line and field, in the style of lightly/MONAI argument checks.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from t3d_data.errors import ManifestError
from t3d_data.text import decode_utf8, is_report_path, normalise_report

__all__ = ["MODALITIES", "SPLITS", "StudyRecord", "load_manifest", "patient_split"]

SPLITS = ("train", "val", "test")
MODALITIES = ("CT", "MR")
# BCP-47-ish: a 2-3 letter language, then optional script/region/variant subtags
_LANGUAGE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*")
_SUFFIXES = (".jsonl", ".json", ".ndjson", ".csv")
Split = Literal["train", "val", "test"]


def _resolve(value: str | Path, info: ValidationInfo) -> Path:
    path = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path


class StudyRecord(BaseModel):
    """One study of the manifest.

    Attributes:
        study_id: unique id of the study.
        patient_id: patient id (splits never share a patient).
        image: NIfTI file or DICOM series folder, or a list of NIfTI files (one per channel,
            all in one voxel grid, e.g. BraTS ``[t1n, t1c, t2w, t2f]``); resolved against the
            manifest's folder. In CSV, a list is a JSON array string.
        report: inline report text, or a path ending in ``.txt`` (resolved likewise);
            ``None`` for label-only (e.g. segmentation) studies, which pre-training refuses.
        split: ``"train"``, ``"val"`` or ``"test"``; ``None`` when not assigned yet.
        labels: finding name -> 0/1.
        mask: optional NIfTI label map in the image's voxel grid.
        channels: channel names, e.g. ``["t1n", "t1c", "t2w", "t2f"]``; as many as ``image``
            paths when ``image`` is a list (a single 4D file's count is checked when read).
        modality: ``"CT"`` or ``"MR"``.
        language: language tag of the report, BCP-47 style (``"en"``, ``"es"``, ``"pt-BR"``).
        meta: free object of dataset metadata (kept as given, e.g. CT-RATE's rescale
            slope/intercept; see docs/datasets.md). In CSV, a JSON object string.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    study_id: str
    patient_id: str
    image: Path | list[Path]
    report: str | None = None
    split: Split | None = None
    labels: dict[str, int] = {}
    mask: Path | None = None
    channels: list[str] | None = None
    modality: Literal["CT", "MR"] = "CT"
    language: str = "en"
    meta: dict[str, Any] = {}
    _inline_replaced_bytes: int = PrivateAttr(0)

    @field_validator("study_id", "patient_id", mode="before")
    @classmethod
    def _non_empty_id(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty id")
        return value.strip() if isinstance(value, str) else value

    @field_validator("image", "mask", mode="before")
    @classmethod
    def _resolve_path(cls, value: Any, info: ValidationInfo) -> Any:
        if (info.field_name == "image" and isinstance(value, str)
                and value.strip().startswith("[")):
            value = _json_cell(value, list, "a JSON array of paths")
        if isinstance(value, list) and info.field_name == "image":
            if not value:
                raise ValueError("empty list of paths")
            paths = []
            for k, v in enumerate(value):
                if not isinstance(v, str | Path) or not str(v).strip():
                    raise ValueError(f"item {k}: expected a non-empty path, got {v!r}")
                paths.append(_resolve(str(v).strip(), info))
            if len(set(paths)) != len(paths):
                raise ValueError("the same path is listed twice")
            return paths
        if value is None or (isinstance(value, str) and not value.strip()):
            if info.field_name == "image":
                raise ValueError("empty path")
            return None
        if isinstance(value, str | Path):
            return _resolve(str(value).strip(), info)
        return value

    @field_validator("channels", mode="before")
    @classmethod
    def _parse_channels(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = _json_cell(value, list, "a JSON array of channel names")
        if isinstance(value, list):
            if not value or any(not isinstance(c, str) or not c.strip() for c in value):
                raise ValueError("expected a non-empty list of non-empty channel names")
            if len(set(value)) != len(value):
                raise ValueError(f"duplicate channel names in {value}")
            return [c.strip() for c in value]
        return value

    @field_validator("channels")
    @classmethod
    def _channels_match_image(cls, value: list[str] | None, info: ValidationInfo
                              ) -> list[str] | None:
        image = info.data.get("image")
        if value is not None and isinstance(image, list) and len(value) != len(image):
            raise ValueError(f"{len(value)} channel names for {len(image)} image paths; give "
                             "one name per path of 'image'")
        return value

    @field_validator("language", mode="before")
    @classmethod
    def _check_language(cls, value: Any) -> Any:
        if isinstance(value, str) and not _LANGUAGE.fullmatch(value.strip()):
            raise ValueError(f"invalid language tag {value!r}; use a BCP-47 tag such as 'en', "
                             "'es' or 'pt-BR'")
        return value.strip() if isinstance(value, str) else value

    @field_validator("meta", mode="before")
    @classmethod
    def _parse_meta(cls, value: Any) -> Any:
        if value is None or value == "":
            return {}
        if isinstance(value, str):
            return _json_cell(value, dict, "a JSON object")
        return value

    @field_validator("report", mode="before")
    @classmethod
    def _check_report(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or not isinstance(value, str):
            return value
        if is_report_path(value):
            return str(_resolve(value.strip(), info))
        if not normalise_report(value):
            raise ValueError("empty text")
        return value

    @field_validator("split", mode="before")
    @classmethod
    def _empty_split(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("labels", mode="before")
    @classmethod
    def _parse_labels(cls, value: Any) -> Any:
        if value is None or value == "":
            return {}
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"invalid JSON ({err.msg})") from None
        if not isinstance(value, dict):
            raise ValueError("must map finding names to 0/1")
        for name, v in value.items():
            if isinstance(v, bool) or v not in (0, 1):
                raise ValueError(f"finding '{name}' must be 0 or 1, got {v!r}")
        return {str(k): int(v) for k, v in value.items()}

    @property
    def report_path(self) -> Path | None:
        """The report file when ``report`` names one, else ``None``."""
        if self.report is None or not is_report_path(self.report):
            return None
        return Path(self.report)

    @property
    def image_paths(self) -> tuple[Path, ...]:
        """Every image path: one for a single file or folder, one per channel for a list."""
        return tuple(self.image) if isinstance(self.image, list) else (self.image,)

    @property
    def n_channels(self) -> int:
        """Channels as far as the manifest tells: ``len(channels)`` when given, else the number
        of image paths (a single 4D NIfTI without ``channels`` counts as 1 here; its real count
        is known only when it is read)."""
        return len(self.channels) if self.channels is not None else len(self.image_paths)

    @property
    def inline_replaced_bytes(self) -> int:
        """Invalid UTF-8 bytes of the manifest itself replaced in an inline ``report``."""
        return self._inline_replaced_bytes


def _json_cell(value: str, kind: type, what: str) -> Any:
    """Parses a JSON value given as a string (a CSV cell); ``kind`` is the expected type."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err.msg}); expected {what}") from None
    if not isinstance(parsed, kind):
        raise ValueError(f"expected {what}, got {value!r}")
    return parsed


def _repair_utf8(value: Any) -> tuple[Any, int]:
    """Replaces invalid UTF-8 (read as surrogate escapes) like ``errors="replace"``, counting
    the replaced bytes, in a string or any string inside lists and dicts."""
    if isinstance(value, str):
        if not any("\udc80" <= c <= "\udcff" for c in value):
            return value, 0
        return decode_utf8(value.encode("utf-8", "surrogateescape"))
    if isinstance(value, list):
        fixed = [_repair_utf8(v) for v in value]
        return [v for v, _ in fixed], sum(n for _, n in fixed)
    if isinstance(value, dict):
        total, out = 0, {}
        for k, v in value.items():
            (k, nk), (v, nv) = _repair_utf8(k), _repair_utf8(v)
            out[k] = v
            total += nk + nv
        return out, total
    return value, 0


def _rows_jsonl(path: Path, errors: list[str]) -> Iterator[tuple[int, Any]]:
    with path.open("r", encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                errors.append(f"{path.name} line {lineno}: invalid JSON ({err.msg})")


def _rows_csv(path: Path, errors: list[str]) -> Iterator[tuple[int, Any]]:
    with path.open("r", encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            errors.append(f"{path.name} line 1: missing header row")
            return
        start = 2
        for row in reader:
            lineno, start = start, reader.line_num + 1
            if None in row:
                errors.append(f"{path.name} line {lineno}: more cells than header columns")
                continue
            optional = ("split", "mask", "labels", "channels", "modality", "language", "meta")
            row = {k: v for k, v in row.items() if not (v in ("", None) and k in optional)}
            yield lineno, row


def _format_error(name: str, lineno: int, err: dict[str, Any], study: str | None) -> str:
    field = ".".join(str(p) for p in err["loc"]) or "<row>"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field (allowed: " + ", ".join(StudyRecord.model_fields) + ")"
    elif err["type"] == "missing":
        msg = "required field is missing"
    tail = f" (study '{study}')" if study else ""
    return f"{name} line {lineno}: field '{field}': {msg}{tail}"


def load_manifest(path: str | Path, *, check_files: bool = True) -> list[StudyRecord]:
    """Reads and validates a JSONL or CSV manifest.

    Args:
        path: ``*.jsonl`` / ``*.json`` (one object per line) or ``*.csv`` (header row; the
            ``labels`` and ``meta`` columns hold JSON object strings, a multi-channel ``image``
            and ``channels`` JSON array strings; empty optional cells are unset; a CSV
            without a ``report`` column has no reports, an empty ``report`` cell is an
            error).
        check_files: also report images (every path of a list), masks and report files that
            do not exist. ``prepare``
            passes ``False`` so that a missing file quarantines one study instead.

    Returns:
        The records, in file order.

    Invalid UTF-8 in the file is replaced by U+FFFD; in an inline ``report`` the replaced
    bytes are counted (:attr:`StudyRecord.inline_replaced_bytes`).

    Raises:
        ManifestError: listing all errors of the file at once, e.g.
            ``"studies.jsonl line 17: field 'report': empty text (study 'ct_0042')"``, and one
            per patient whose studies are in more than one split; a folder instead of a file
            gets a hint naming the manifest it holds.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / "manifest.jsonl"] if (path / "manifest.jsonl").is_file() else sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _SUFFIXES)
        hint = (f"did you mean {found[0]}?" if found
                else "it holds no .jsonl or .csv file; give the manifest's path")
        raise ManifestError([f"{path}: expected a manifest file, got a folder; {hint}"])
    if not path.is_file():
        raise ManifestError([f"{path}: manifest not found"])
    errors: list[str] = []
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _rows_csv(path, errors)
    elif suffix in _SUFFIXES:
        rows = _rows_jsonl(path, errors)
    else:
        raise ManifestError([f"{path}: unknown manifest format '{suffix}' (use .jsonl or .csv)"])
    context = {"base_dir": path.parent.resolve()}
    records: list[StudyRecord] = []
    first_line: dict[str, int] = {}
    for lineno, row in rows:
        if not isinstance(row, dict):
            errors.append(f"{path.name} line {lineno}: expected a JSON object")
            continue
        replaced = {}
        for key in list(row):
            row[key], replaced[key] = _repair_utf8(row[key])
        study = row.get("study_id")
        study = str(study) if study not in (None, "") else None
        try:
            rec = StudyRecord.model_validate(row, context=context)
        except ValidationError as err:
            errors.extend(_format_error(path.name, lineno, e, study) for e in err.errors())
            continue
        if rec.study_id in first_line:
            errors.append(f"{path.name} line {lineno}: field 'study_id': duplicate of line "
                          f"{first_line[rec.study_id]} (study '{rec.study_id}')")
            continue
        first_line[rec.study_id] = lineno
        if rec.report_path is None:
            rec._inline_replaced_bytes = replaced.get("report", 0)
        if check_files:
            paths = [("image", p) for p in rec.image_paths]
            paths += [("mask", rec.mask), ("report", rec.report_path)]
            for field, p in paths:
                if p is not None and not p.exists():
                    errors.append(f"{path.name} line {lineno}: field '{field}': file not found: "
                                  f"{p} (study '{rec.study_id}')")
        records.append(rec)
    errors.extend(_patient_leaks(path.name, records, first_line))
    if not records and not errors:
        errors.append(f"{path.name}: no studies")
    if errors:
        raise ManifestError(errors)
    return records


def _patient_leaks(name: str, records: Sequence[StudyRecord], lines: Mapping[str, int]
                   ) -> list[str]:
    """One error per patient whose studies are in more than one split."""
    splits: dict[str, dict[str, list[int]]] = {}
    for r in records:
        if r.split is not None:
            splits.setdefault(r.patient_id, {}).setdefault(r.split, []).append(lines[r.study_id])
    errors = []
    for patient, by_split in splits.items():
        if len(by_split) < 2:
            continue
        parts = []
        for split, nums in by_split.items():
            shown = ", ".join(map(str, nums[:10])) + (f" and {len(nums) - 10} more"
                                                      if len(nums) > 10 else "")
            parts.append(f"'{split}' (line{'s' if len(nums) > 1 else ''} {shown})")
        errors.append(f"{name}: patient '{patient}' is in more than one split: {', '.join(parts)}; "
                      "splits must never share a patient: put all of its studies in one split "
                      "(field 'split')")
    return errors


def patient_split(
    records: Sequence[StudyRecord],
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
) -> list[StudyRecord]:
    """Assigns a split to every record at patient level; existing ``split`` values are kept.

    Patients with an existing split keep it for all their studies (and count towards that
    split's target); the remaining patients are shuffled with ``seed`` and each goes to the split
    furthest below its target number of patients.

    Args:
        records: the studies.
        fractions: split -> fraction of patients, default ``{"train": .8, "val": .1, "test": .1}``.
        seed: shuffling seed.

    Returns:
        New records (same order) with ``split`` set.

    Raises:
        ValueError: unknown split names, fractions not summing to 1, or a patient whose
            existing splits disagree.
    """
    fractions = dict(fractions or {"train": 0.8, "val": 0.1, "test": 0.1})
    unknown = set(fractions) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; allowed: {list(SPLITS)}")
    if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1; got {fractions}")
    fixed: dict[str, str] = {}
    patients = list(dict.fromkeys(r.patient_id for r in records))
    for r in records:
        if r.split is not None:
            prev = fixed.get(r.patient_id)
            if prev is not None and prev != r.split:
                raise ValueError(f"patient '{r.patient_id}' has studies in both '{prev}' and "
                                 f"'{r.split}' (study '{r.study_id}'); a patient must stay in one split")
            fixed[r.patient_id] = r.split
    free = [p for p in patients if p not in fixed]
    n = len(patients)
    target = {s: fractions.get(s, 0.0) * n for s in SPLITS}
    count = {s: sum(1 for v in fixed.values() if v == s) for s in SPLITS}
    order = np.random.default_rng(seed).permutation(len(free))
    assigned = dict(fixed)
    for k in order:
        split = max(SPLITS, key=lambda s: (target[s] - count[s], -SPLITS.index(s)))
        assigned[free[k]] = split
        count[split] += 1
    return [r if r.split is not None else r.model_copy(update={"split": assigned[r.patient_id]})
            for r in records]
