"""Shared plumbing of the evaluation scripts: CLI → config, model loading, store checks.

Heavy imports (torch, t3d_models) happen inside the functions, so a config error is reported
before any of them is paid for.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from t3d_train.config import ConfigError, load_config

M = TypeVar("M", bound=BaseModel)


def eval_parser(description: str, shortcuts: dict[str, str]) -> argparse.ArgumentParser:
    """``--config``/``--set`` plus shortcut flags, each an alias for one ``--set`` field."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML config (tools/configs/eval/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="override one config field (repeatable)")
    for flag, field in shortcuts.items():
        if field.endswith("=true"):
            p.add_argument(f"--{flag}", action="store_true", help=f"same as --set {field}")
        else:
            p.add_argument(f"--{flag}", metavar=field.upper().replace(".", "_"),
                           help=f"same as --set {field}=VALUE")
    return p


def parse_config(model: type[M], argv: list[str] | None, description: str,
                 shortcuts: dict[str, str]) -> M:
    """Parse the command line into a validated config (raises :class:`ConfigError`)."""
    args = eval_parser(description, shortcuts).parse_args(argv)
    overrides = list(args.overrides)
    for flag, field in shortcuts.items():
        value = getattr(args, flag.replace("-", "_"))
        if field.endswith("=true"):
            if value:
                overrides.append(field)
        elif value is not None:
            overrides.append(f"{field}={value}")
    defaults = None if args.config is not None else {}
    return load_config(model, args.config, overrides, defaults=defaults)


def check_store(store: Path | str) -> None:
    if isinstance(store, str) and "://" in store:  # object storage: VolumeStore checks it
        return
    store = Path(store)
    if not store.exists():
        raise ConfigError(f"store: {store} does not exist; pass the folder written by "
                          "`t3d-data prepare MANIFEST OUT` (or `t3d-data demo DIR`)")
    if not (store / "index.json").is_file():
        raise ConfigError(f"store: {store} is not a prepared store (no index.json); run "
                          "`t3d-data prepare MANIFEST OUT` (or `t3d-data demo DIR`) first")


def check_checkpoint(section: Any) -> None:
    """``section.checkpoint`` (if set) is a ``save_pretrained`` folder: it has config.json."""
    if section.checkpoint is None:
        return
    ckpt = Path(section.checkpoint)
    if not ckpt.exists():
        raise ConfigError(f"model.checkpoint: {ckpt} does not exist; pass the folder written by "
                          "save_pretrained (e.g. RUN/model), or --set model.checkpoint=null for "
                          "the no-pre-training baseline")
    if not (ckpt / "config.json").is_file():
        raise ConfigError(f"model.checkpoint: {ckpt} has no config.json; pass the folder written "
                          "by save_pretrained (e.g. RUN/model)")


def check_inputs(cfg: Any) -> None:
    """Every input path of an evaluation config, checked before torch or a model is loaded.

    A wrong ``--store`` or ``--checkpoint`` fails in a second instead of after the imports.
    """
    check_checkpoint(cfg.model)
    check_store(cfg.store)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} is a file; pass a folder for the results")
    tasks = getattr(cfg, "tasks", None)
    if tasks is not None:
        from t3d_data.tasks import available_tasks

        if tasks not in available_tasks():
            raise ConfigError(f"tasks: no dataset tasks named {tasks!r}; known: "
                              f"{', '.join(available_tasks())}")
    findings = getattr(cfg, "findings", None)
    if findings is not None and not Path(findings).is_file():
        raise ConfigError(f"findings: {findings} does not exist; pass the phantom findings "
                          "sidecar (phantom_findings.jsonl) or leave it out to find it next to "
                          "the store")


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def load_model(section: Any, seed: int = 0):
    """A T3DModel from ``section.checkpoint``, or the random-init ``section.preset`` if null."""
    import torch
    from t3d_models import T3DModel

    if section.checkpoint is None:
        torch.manual_seed(seed)
        return T3DModel.from_preset(section.preset).eval()
    ckpt = Path(section.checkpoint)
    if not (ckpt / "config.json").is_file():
        raise ConfigError(f"model.checkpoint: {ckpt} has no config.json; pass the folder written "
                          "by save_pretrained (e.g. RUN/model)")
    return T3DModel.from_pretrained(ckpt).eval()


def model_config(section: Any):
    """The T3DModelConfig of a checkpoint or preset, without building the model."""
    from t3d_models import T3DModelConfig

    if section.checkpoint is None:
        try:
            return T3DModelConfig.from_preset(section.preset)
        except ValueError as err:
            raise ConfigError(f"model.preset: {err}") from None
    path = Path(section.checkpoint) / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.checkpoint: {section.checkpoint} has no config.json; pass the "
                          "folder written by save_pretrained (e.g. RUN/model)")
    return T3DModelConfig.from_json(str(path))


def store_tasks(store: Path, name: str | None = None, task: str | None = None):
    """The store's ``t3d_data.tasks.DatasetTasks`` (``name``, else detected; ``None`` when it has
    none), or, with ``task`` (``"zero_shot"``, ``"segmentation"``, ``"twins"``), the provider
    that has it. A missing or incomplete provider is a one-line :class:`ConfigError`."""
    from t3d_data.tasks import TasksError, require_tasks, tasks_for_store

    try:
        if task is None:
            return tasks_for_store(store, name)
        return require_tasks(store, task, name)
    except TasksError as err:
        raise ConfigError(str(err)) from None


def baseline_sentence(section: Any, encoder: str = "encoder") -> str:
    """The closing summaries' pointer to the no-pre-training baseline (``section``: ``cfg.model``)."""
    if section.checkpoint is None:
        return f" This is the no-pre-training baseline (random-init {section.preset} {encoder})."
    return " The no-pre-training baseline is the same command with --set model.checkpoint=null."


def subset(dataset: Any, max_items: int | None) -> list[int]:
    """The first ``max_items`` indices of ``dataset`` (all when None)."""
    n = len(dataset)
    return list(range(n if max_items is None else min(n, max_items)))
