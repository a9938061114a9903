"""Atomic, pruned checkpoints around ``accelerator.save_state``.

A checkpoint is written into ``checkpoints/.tmp-<step>``, completed with ``trainer_state.json``
and a ``COMPLETE`` marker, then renamed to ``checkpoints/step-<step>``: a crash never leaves a
folder that looks complete. ``latest`` is chosen by the step recorded inside the state file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

MARKER = "COMPLETE"
STATE = "trainer_state.json"


def write_json_atomic(path: Path, payload: Any) -> None:
    """``json.dump`` into a temp file, then ``os.replace`` (atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint under ``root``, oldest first."""
    found = []
    if root.is_dir():
        for folder in root.iterdir():
            if folder.is_dir() and (folder / MARKER).is_file() and (folder / STATE).is_file():
                step = json.loads((folder / STATE).read_text(encoding="utf-8"))["step"]
                found.append((int(step), folder))
    return sorted(found)


def resolve_resume(spec: str, root: Path) -> Path:
    """``latest`` → the newest complete checkpoint under ``root``; else a checkpoint folder.

    Raises:
        FileNotFoundError: nothing to resume from, or the folder is not a complete checkpoint.
    """
    if spec == "latest":
        found = complete_checkpoints(root)
        if not found:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint under {root}")
        return found[-1][1]
    path = Path(spec)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(
            f"--resume {spec}: not a complete checkpoint (no {MARKER} marker); "
            f"use --resume latest or one of the step-* folders under {root}")
    return path


def finalize(tmp: Path, root: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Main process only: mark ``tmp`` complete, rename it into place, prune old ones."""
    write_json_atomic(tmp / STATE, state)
    (tmp / MARKER).write_text("ok\n", encoding="utf-8")
    final = root / f"step-{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final
