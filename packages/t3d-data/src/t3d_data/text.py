"""Report text: UTF-8 decoding with counted replacements, whitespace normalisation, report groups.

Follows the T3D data rules (docs/method.md, "Data"): invalid bytes are replaced and
counted, whitespace runs collapse, line breaks between sections and headers are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from t3d_data.errors import ReportError

__all__ = ["ReportText", "decode_utf8", "is_report_path", "load_report", "normalise_report",
           "report_group_ids"]

# Horizontal whitespace: everything \s matches except the line break itself.
_HSPACE = re.compile(r"[^\S\n]+")
_BLANK_RUNS = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class ReportText:
    """A normalised report.

    Attributes:
        text: normalised text (never empty).
        replaced_bytes: number of invalid UTF-8 bytes replaced by U+FFFD.
    """

    text: str
    replaced_bytes: int = 0


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Decodes UTF-8 like ``errors="replace"`` and counts the replaced bytes.

    Args:
        raw: encoded text.

    Returns:
        ``(text, replaced_bytes)``.

    >>> decode_utf8(b"caf\\xe9 ok")
    ('caf\\ufffd ok', 1)
    """
    parts: list[str] = []
    replaced = 0
    pos = 0
    while True:
        try:
            parts.append(raw[pos:].decode("utf-8"))
            break
        except UnicodeDecodeError as err:
            parts.append(raw[pos:pos + err.start].decode("utf-8"))
            parts.append("\ufffd")
            replaced += err.end - err.start
            pos += err.end
    return "".join(parts), replaced


def normalise_report(text: str) -> str:
    """Normalises whitespace, keeping the report's line structure.

    Line endings become ``\\n``; runs of spaces/tabs (any horizontal whitespace) become one
    space; lines are stripped; runs of blank lines collapse to one blank line (a section break);
    leading/trailing blank lines and a byte-order mark are removed.

    >>> normalise_report("FINDINGS:\\t  clear  lungs.\\r\\n\\r\\n\\r\\nIMPRESSION:  normal ")
    'FINDINGS: clear lungs.\\n\\nIMPRESSION: normal'
    """
    text = text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")
    lines = [_HSPACE.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip("\n")


def is_report_path(value: str) -> bool:
    """True when a manifest ``report`` value names a text file rather than holding the text."""
    return value.strip().lower().endswith(".txt") and "\n" not in value.strip()


def load_report(value: str, base_dir: str | Path = ".") -> ReportText:
    """Loads and normalises a report given inline or as a path to a ``.txt`` file.

    Args:
        value: the manifest's ``report`` value: inline text, or a path ending in ``.txt``
            (relative paths are resolved against ``base_dir``).
        base_dir: the manifest's folder.

    Returns:
        The normalised text and the number of replaced invalid bytes.

    Raises:
        ReportError: the file is missing/unreadable or the text is empty after normalisation.
    """
    replaced = 0
    path = None
    if is_report_path(value):
        path = Path(value.strip())
        if not path.is_absolute():
            path = Path(base_dir) / path
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise ReportError(f"cannot read report file {path}: {err.strerror or err}") from err
        text, replaced = decode_utf8(raw)
    else:
        text = value
    text = normalise_report(text)
    if not text and path is not None:
        raise ReportError(f"report file {path}: empty text ({len(raw)} bytes, only whitespace); "
                          "write the report or drop the study from the manifest")
    if not text:
        raise ReportError("empty text")
    return ReportText(text=text, replaced_bytes=replaced)


def report_group_ids(reports: list[str]) -> list[int]:
    """Gives identical (normalised) reports the same group id, ids in order of first appearance.

    >>> report_group_ids(["No acute findings.", "Nodule.", "No  acute findings. "])
    [0, 1, 0]
    """
    ids: dict[str, int] = {}
    return [ids.setdefault(normalise_report(r), len(ids)) for r in reports]
