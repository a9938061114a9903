"""Atomic, pruned checkpoints around ``accelerator.save_state``.

A checkpoint is written into ``checkpoints/.tmp-<step>`` (stale temp folders of a killed write
are removed first), completed with ``trainer_state.json`` and a ``COMPLETE`` marker, every file
and folder is fsync'ed, then it is renamed to ``checkpoints/step-<step>``: a crash never leaves
a folder that looks complete. ``latest`` is chosen by the step recorded inside the state file;
a complete checkpoint whose state file cannot be read is skipped with a warning.

Layout of ``step-<step>/``: ``model/`` (the model, once, as ``save_pretrained`` writes it:
loadable by every tool's ``--checkpoint``), ``objective.safetensors`` (the objective's learnable
temperatures), accelerate's optimizer, scheduler and RNG states, ``trainer_state.json`` and
``COMPLETE``. Checkpoints written before the model was stored once (accelerate's
``model.safetensors`` of the model + objective module) still resume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from t3d_train.config import ConfigError
from t3d_train.files import fsync_dir, fsync_tree, write_json_atomic, write_text_atomic

log = logging.getLogger("t3d.checkpoint")

MARKER = "COMPLETE"
STATE = "trainer_state.json"
MODEL_DIR = "model"
OBJECTIVE = "objective.safetensors"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"


def read_state(folder: Path) -> dict[str, Any]:
    """The parsed ``trainer_state.json`` of a checkpoint folder.

    Raises:
        ConfigError: the file is missing, not JSON (e.g. truncated) or has no integer ``step``.
    """
    path = folder / STATE
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        step = payload["step"]
        if not isinstance(step, int) or not isinstance(payload.get("state"), dict):
            raise ValueError("'step' must be an integer and 'state' a mapping")
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        what = f"no field {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
        raise ConfigError(f"{path}: unreadable trainer state ({what})") from None
    return payload


def complete_checkpoints(root: Path, warn: bool = True) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete ``step-*`` checkpoint under ``root``, oldest first.

    A folder with the ``COMPLETE`` marker whose state file cannot be read is left out (with a
    warning when ``warn``); temp folders of unfinished writes never count.
    """
    found = []
    if root.is_dir():
        for folder in root.iterdir():
            if not (folder.name.startswith(PREFIX) and folder.is_dir()
                    and (folder / MARKER).is_file()):
                continue
            try:
                found.append((read_state(folder)["step"], folder))
            except ConfigError as exc:
                if warn:
                    log.warning("checkpoint %s skipped: %s", folder, exc)
    return sorted(found)


def resolve_resume(spec: str, root: Path) -> Path:
    """``latest`` → the newest complete checkpoint under ``root``; else a checkpoint folder.

    Cheap (no torch), so ``tools/pretrain.py`` calls it before building anything.

    Raises:
        ConfigError: nothing to resume from, or the folder is not a complete, readable checkpoint.
    """
    if spec == "latest":
        found = complete_checkpoints(root)
        if not found:
            raise ConfigError(
                f"--resume latest: no complete checkpoint under {root}; start without --resume, "
                "or point run.output_dir at the run to continue")
        return found[-1][1]
    path = Path(spec)
    if not (path / MARKER).is_file():
        raise ConfigError(
            f"--resume {spec}: not a complete checkpoint (no {MARKER} marker); "
            f"use --resume latest or one of the {PREFIX}* folders under {root}")
    try:
        read_state(path)
    except ConfigError as exc:
        raise ConfigError(f"--resume {spec}: {exc}; use --resume latest or another "
                          f"{PREFIX}* folder under {root}") from None
    return path


def clear_stale(root: Path) -> None:
    """Main process only: remove the ``.tmp-*`` folders that killed checkpoint writes left."""
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                log.info("removing %s (left by an unfinished checkpoint write)", entry)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


def tmp_folder(root: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is complete."""
    return root / f"{TMP_PREFIX}{step:08d}"


def save_module_weights(module: Any, folder: Path, card: dict[str, Any] | None = None) -> None:
    """Main process only: ``module.model`` into ``folder/model/`` (``card``: facts for its
    ``README.md`` model card, e.g. ``{"steps": 100}``), ``module.objective``'s tensors into
    ``folder/objective.safetensors``."""
    from t3d_models.io import save_state_file

    module.model.save_pretrained(folder / MODEL_DIR, card=card)
    state = {k: v.detach().cpu().contiguous() for k, v in module.objective.state_dict().items()}
    save_state_file(state, folder / OBJECTIVE)


def load_module_weights(module: Any, folder: Path) -> None:
    """Every process: load what :func:`save_module_weights` wrote, strictly (keys and shapes).

    Raises:
        ValueError: missing, unexpected or mismatched keys, named in the message.
    """
    from safetensors.torch import load_file
    from t3d_models.io import check_state_dict, load_state_file

    for part, state in ((module.model, load_state_file(folder / MODEL_DIR)),
                        (module.objective, load_file(str(folder / OBJECTIVE)))):
        check_state_dict(part.state_dict(), state, what=f"checkpoint {folder}")
        part.load_state_dict(state, strict=True)


def finalize(tmp: Path, root: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Main process only: mark ``tmp`` complete, fsync it, rename it into place, prune old ones."""
    write_json_atomic(tmp / STATE, state)
    write_text_atomic(tmp / MARKER, "ok\n")
    fsync_tree(tmp)
    final = root / f"{PREFIX}{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for _, old in complete_checkpoints(root, warn=False)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def trim_log(path: Path, last_step: int) -> int:
    """Main process only: keep the records of ``log.jsonl`` with ``step <= last_step``.

    Run before training starts (``last_step`` is the resumed step, 0 for a fresh run), so the
    log holds each step once: steps logged after the checkpoint by a killed run are dropped and
    logged again. A torn last line is dropped too. Atomic. Returns the number of records kept.
    """
    if not path.is_file():
        return 0
    kept: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) \
                and record["step"] <= last_step:
            kept[record["step"]] = line + "\n"  # a step logged twice (older runs): the last wins
    write_text_atomic(path, "".join(kept[step] for step in sorted(kept)))
    return len(kept)
