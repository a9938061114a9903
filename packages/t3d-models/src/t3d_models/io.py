"""Save and load T3D checkpoints: ``config.json`` + ``model.safetensors`` (no pickle).

The safetensors file holds every tensor, the text encoder's included, so a checkpoint is
self-contained; ``text_encoder/`` keeps the Hugging Face config and tokenizer so it reloads
offline; ``README.md`` is the model card (:mod:`t3d_models.card`). The folder is a Hugging Face
model repo: :func:`load_pretrained` also takes a hub id (:mod:`t3d_models.hub`). Writes are atomic per file (temp file + fsync + ``os.replace``, then the folder is
fsync'ed); files and folders get the usual umask-respecting modes (0644 / 0755 under umask 022).
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import __version__
from .config import T3DModelConfig

if TYPE_CHECKING:
    from .card import CardFacts
    from .model import T3DModel

__all__ = ["CONFIG_NAME", "TEXT_DIR", "WEIGHTS_NAME", "load_pretrained", "load_state_file",
           "save_pretrained", "save_state_file"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TEXT_DIR = "text_encoder"


def _temp_name(folder: Path, name: str) -> Path:
    return folder / f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _new_temp_file(folder: Path, name: str) -> tuple[int, Path]:
    """A new, exclusive temp file next to ``name``, mode 0666 minus the umask (mkstemp: 0600)."""
    while True:
        tmp = _temp_name(folder, name)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _file_mode() -> int:
    """0666 minus the process umask (read from /proc where possible: os.umask changes it)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = _new_temp_file(path.parent, path.name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def _state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state, seen = {}, {}
    for key, tensor in model.state_dict().items():
        t = tensor.detach()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        # safetensors refuses shared storage; the loader copies each key anyway
        state[key] = t.clone().contiguous() if ptr in seen or not t.is_contiguous() else t
        seen[ptr] = key
    return {k: v.cpu() for k, v in state.items()}


def _parameter_counts(model: T3DModel) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.vision.parameters())
    text = sum(p.numel() for p in model.text.parameters())
    return {"total": total, "vision": vision, "text": text, "interactor and heads": total - vision - text}


def save_pretrained(model: T3DModel, path: str | os.PathLike,
                    card: CardFacts | dict | None = None) -> None:
    """Write a checkpoint directory (a Hugging Face model repo).

    Layout: ``config.json`` (the resolved :class:`T3DModelConfig`), ``model.safetensors`` (all
    tensors), ``text_encoder/`` (HF config + tokenizer files, for offline reloading),
    ``README.md`` (the model card: architecture, preset, preprocessing record, intended use,
    limits, and whatever ``card`` adds).
    Each file is written to a temporary name, fsync'ed and moved into place with
    ``os.replace``; ``config.json`` goes last, so its presence marks a complete checkpoint.

    Args:
        model: the model.
        path: the folder (created if needed; existing files are replaced).
        card: training facts for the card (:class:`t3d_models.card.CardFacts` or its dict:
            ``steps``, ``data``, ``command``, ``metrics``, ``chance``, ``metrics_command``,
            ``notes``); ``None`` writes a card from the config alone.

    Raises:
        ValueError: an unknown or mistyped card field (checked before anything is written).
    """
    from .card import CARD_NAME, _facts, model_card

    out = Path(path)
    card_text = model_card(model.config, _facts(card, f"save_pretrained({out})"),
                           _parameter_counts(model))
    out.mkdir(parents=True, exist_ok=True)
    # text encoder folder: write aside, then swap in
    tmp_text = _temp_name(out, TEXT_DIR)
    tmp_text.mkdir(mode=0o777)  # minus the umask (mkdtemp: 0700)
    try:
        model.text.model.config.save_pretrained(tmp_text)
        model.text.tokenizer.save_pretrained(tmp_text)
        _fsync_tree(tmp_text)
        final_text = out / TEXT_DIR
        old = None
        if final_text.exists():
            old = out / f".{TEXT_DIR}.old-{os.getpid()}"
            os.replace(final_text, old)
        os.replace(tmp_text, final_text)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp_text, ignore_errors=True)

    save_state_file(_state_for_saving(model), out / WEIGHTS_NAME)
    _atomic_write_text(out / CARD_NAME, card_text)
    _atomic_write_text(out / CONFIG_NAME, model.config.to_json() + "\n")


def save_state_file(state: dict[str, torch.Tensor], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> None:
    """Write ``state`` (contiguous CPU tensors, no shared storage) as a safetensors file.

    Atomic: a temp file next to ``path``, fsync'ed, given the umask's mode (safetensors itself
    writes 0600), then ``os.replace``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = _new_temp_file(path.parent, path.name)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", "t3d_models": __version__,
                                        **(metadata or {})})
        os.chmod(tmp, _file_mode())
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_state_file(path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` from a checkpoint directory (or a file path)."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} at {p}")
    return load_file(str(p), device=str(device))


def _fmt(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor],
                     what: str = "checkpoint") -> None:
    """Raise if ``loaded`` has missing, unexpected or shape-mismatched keys.

    Raises:
        ValueError: naming every offending key (first few of each kind) and the shapes.
    """
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(loaded[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(loaded))
        if tuple(loaded[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_fmt(mismatched)}")
    if problems:
        raise ValueError(f"{what} does not match the model: " + "; ".join(problems))


def load_pretrained(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                    token: str | bool | None = None) -> T3DModel:
    """Rebuild a model from ``config.json`` and load ``model.safetensors`` strictly.

    ``path`` is a local folder or a Hugging Face hub id (``namespace/name``), fetched with
    ``huggingface_hub.snapshot_download`` (``revision``, ``cache_dir``, ``token``; offline
    under ``HF_HUB_OFFLINE=1``, from the cache only). The card (``README.md``) is not needed.
    The text tower is rebuilt from ``text_encoder/`` when present (offline, random init, then
    overwritten), otherwise from ``config.text.model_name_or_path``.

    Raises:
        FileNotFoundError: ``config.json`` or ``model.safetensors`` missing, or a hub id that
            is neither cached nor downloadable (the message says how to fix it).
        ValueError: missing/unexpected keys or shape mismatches (named in the message).
    """
    from .hub import resolve_model_folder
    from .model import T3DModel

    root = resolve_model_folder(path, revision=revision, cache_dir=cache_dir, token=token)
    cfg_path = root / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {root} (not a T3D checkpoint directory)")
    config = T3DModelConfig.from_json(str(cfg_path))
    text_dir = root / TEXT_DIR
    if text_dir.is_dir():
        model = T3DModel(config, text_source=text_dir)
    else:
        model = T3DModel(config.model_copy(update={"text": config.text.model_copy(
            update={"pretrained": False})}))
    state = load_state_file(root, device=map_location)
    check_state_dict(model.state_dict(), state, what=f"checkpoint {root}")
    model.load_state_dict(state, strict=True)
    return model.to(map_location)
