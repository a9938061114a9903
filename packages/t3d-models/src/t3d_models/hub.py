"""Hugging Face Hub: resolve a hub id to a local model folder, and push a folder to the Hub.

A model folder (``save_pretrained``) is already a Hub model repo: ``config.json``,
``model.safetensors``, ``text_encoder/`` and the ``README.md`` model card. Downloads go
through ``huggingface_hub.snapshot_download`` (its cache, ``HF_HUB_OFFLINE`` and token
handling); uploads through ``HfApi.upload_folder``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["HUB_FILES", "check_repo_id", "push_to_hub", "resolve_model_folder"]

logger = logging.getLogger(__name__)

#: The files of a model repo that loading needs (plus the card).
HUB_FILES = ["config.json", "model.safetensors", "text_encoder/*", "README.md"]


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_model_folder(path_or_id: str | os.PathLike, revision: str | None = None,
                         cache_dir: str | os.PathLike | None = None,
                         token: str | bool | None = None) -> Path:
    """A local folder for ``path_or_id``: the folder itself, or a hub repo's cached snapshot.

    An existing local directory always wins. Anything else that is a valid repo id
    (``"name"`` or ``"namespace/name"``) is fetched with ``snapshot_download`` (only
    :data:`HUB_FILES`), which reuses its cache and, under ``HF_HUB_OFFLINE=1``, never touches
    the network.

    Raises:
        FileNotFoundError: not a local folder and not a repo id, or the repo is neither in the
            cache nor downloadable (offline, no connection, unknown or private repo); the
            message names it and says how to fix it.
    """
    if isinstance(path_or_id, os.PathLike) or Path(path_or_id).is_dir():
        return Path(path_or_id)
    name = str(path_or_id)
    if Path(name).exists() or not _is_repo_id(name):
        raise FileNotFoundError(
            f"{name}: not a model folder, and not a Hugging Face repo id (namespace/name); give "
            "a folder written by save_pretrained (e.g. runs/NAME/model) or a hub id")

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from . import __version__

    where = f"model {name!r}" + (f" (revision {revision!r})" if revision else "")
    try:
        folder = snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token,
                                   allow_patterns=HUB_FILES, library_name="t3d-models",
                                   library_version=__version__)
    except LocalEntryNotFoundError as err:
        if constants.HF_HUB_OFFLINE:
            fix = ("HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE to download it, "
                   f"or run `hf download {name}` where you are online")
        else:
            fix = "the Hub could not be reached: check the connection and retry"
        raise FileNotFoundError(
            f"{where}: no local folder {name!r} and not in the Hugging Face cache; {fix}, or "
            "pass a local folder written by save_pretrained") from err
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise FileNotFoundError(
            f"{where}: not found on the Hugging Face Hub (or private/gated: log in with "
            "`hf auth login` or pass token=), and no local folder of that name") from err
    except RevisionNotFoundError as err:
        raise FileNotFoundError(f"{where}: the repo has no such revision") from err
    return Path(folder)


def check_repo_id(repo_id: str) -> None:
    """Raise ``ValueError`` (saying what a repo id looks like) unless ``repo_id`` is one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"push_to_hub: repo_id {repo_id!r} is not a Hub repo id ({err}); use "
                         "'namespace/name', e.g. 'my-lab/t3d-tiny'") from None


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                token: str | None = None, revision: str | None = None,
                commit_message: str | None = None, create_repo: bool = True) -> Any:
    """Upload a model folder (``save_pretrained`` or ``save_swinunetr``) to a Hub model repo.

    Creates the repo if needed (``create_repo``), then uploads the folder with
    ``HfApi.upload_folder`` in one commit (hidden temp files excluded). A T3D folder without a
    ``README.md`` (written before cards existed) gets its card first.

    Args:
        folder: the local model folder.
        repo_id: ``"namespace/name"`` on the Hub.
        private: visibility of a newly created repo.
        token: a Hub token (default: the logged-in one, ``hf auth login``).
        revision: the branch to commit to (default ``main``).
        commit_message: default ``"Upload <name> with t3d-models"``.
        create_repo: create the repo (``exist_ok``) before uploading.

    Returns:
        The ``CommitInfo`` of ``upload_folder`` (its ``commit_url``, ``oid``, ...).

    Raises:
        ValueError: ``repo_id`` is not a valid repo id.
        FileNotFoundError: ``folder`` has no ``config.json`` or ``model.safetensors``.
    """
    from huggingface_hub import HfApi

    from .card import CARD_NAME, write_model_card
    from .io import CONFIG_NAME, WEIGHTS_NAME

    check_repo_id(repo_id)
    root = Path(folder)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: no {' or '.join(missing)}; push_to_hub uploads a folder "
                                "written by save_pretrained (or save_swinunetr)")
    if not (root / CARD_NAME).is_file():
        logger.info("%s has no %s: writing its model card from %s", root, CARD_NAME, CONFIG_NAME)
        write_model_card(root)
    api = HfApi(token=token)
    if create_repo:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(root), repo_type="model",
                             revision=revision, ignore_patterns=[".*", "**/.*"],
                             commit_message=commit_message or f"Upload {root.name} with t3d-models")
