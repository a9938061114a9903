"""File names from user data: one sanitising helper for every name a tool derives from a study id.

A manifest's ``study_id`` (or a run ``--name``) is user data. :func:`safe_filename` maps any
string to ONE path component that cannot leave its folder: only ``A-Z a-z 0-9 . _ -``, no path
separators, no ``..``, no NUL or control characters, no leading dot, at most ``max_length``
characters. A string that is already such a name is returned unchanged; any other gets a short
hash of the original appended, so ids that sanitise alike (``a/b`` and ``a\\b``, two long ids
with the same prefix) still get distinct names. :func:`safe_join` builds ``root/name`` and
checks that the result stays under ``root``.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

__all__ = ["MAX_NAME_LENGTH", "safe_filename", "safe_join"]

#: Longest name :func:`safe_filename` returns (well under the 255 bytes of common filesystems,
#: leaving room for a prefix and an extension).
MAX_NAME_LENGTH = 100

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_DOTS = re.compile(r"\.{2,}")
_HASH_CHARS = 10


def _is_safe(name: str, max_length: int) -> bool:
    return (
        0 < len(name) <= max_length
        and _UNSAFE.search(name) is None
        and _DOTS.search(name) is None
        and not name.startswith(".")
    )


def safe_filename(text: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """One safe, bounded path component for ``text`` (distinct texts stay distinct).

    Args:
        text: any string (a study id, a run name).
        max_length: the longest name returned (at least 16).

    Returns:
        ``text`` itself when it is already safe (only ``[A-Za-z0-9._-]``, no ``..``, no leading
        dot, not empty, at most ``max_length`` long); otherwise the sanitised text (runs of other
        characters → ``_``, runs of dots → ``.``, leading dots/underscores stripped, cut to fit)
        followed by ``-`` and the first 10 hex digits of the SHA-256 of ``text``.

    Raises:
        TypeError: if ``text`` is not a string.
        ValueError: if ``max_length < 16``.

    Example:
        >>> safe_filename("case_001")
        'case_001'
        >>> safe_filename("a/../../x").startswith("a_._._x-")
        True
    """
    if not isinstance(text, str):
        raise TypeError(f"safe_filename needs a str; got {type(text).__name__}")
    if max_length < 16:
        raise ValueError(f"max_length must be >= 16; got {max_length}")
    if _is_safe(text, max_length):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]
    stem = _DOTS.sub(".", _UNSAFE.sub("_", text)).lstrip("._")
    stem = stem[: max_length - _HASH_CHARS - 1].rstrip(".")
    return f"{stem}-{digest}" if stem else digest


def safe_join(root: str | os.PathLike[str], name: str) -> Path:
    """``root / name`` for a single safe component ``name``, checked to stay under ``root``.

    Args:
        root: the output folder.
        name: one path component, e.g. ``f"{run}_{safe_filename(study_id)}.png"``.

    Returns:
        The joined path (not resolved).

    Raises:
        ValueError: if ``name`` is not a single safe component (a separator, ``..``, NUL, a
            leading dot, empty or over 255 characters) or the path resolves outside ``root``.
    """
    bad = (
        not name
        or len(name) > 255
        or name.startswith(".")
        or _DOTS.search(name) is not None
        or any(c in name for c in ("/", "\\", "\0", os.sep))
        or any(ord(c) < 32 for c in name)
    )
    if bad:
        raise ValueError(
            f"file name {name!r} is not one safe path component; build it with "
            "t3d_data.names.safe_filename"
        )
    path = Path(root) / name
    base = Path(root).resolve()
    if path.resolve().parent != base:
        raise ValueError(f"file name {name!r} resolves outside {root}")
    return path
