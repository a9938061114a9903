"""Dataset-provided evaluation tasks: zero-shot prompts, segmentation classes, report twins.

What a dataset knows about its own labels is data it provides, not code in the evaluation
tools. A :class:`DatasetTasks` names, for one kind of dataset:

- ``zero_shot_prompts``: ``{finding: {"positive": [...], "negative": [...]}}`` paraphrase
  ensembles (the finding names are the store's ``finding_names``);
- ``seg_classes``: ``{class name: [label values]}``, how the label maps' values merge into the
  classes scored by the segmentation benchmark;
- ``twins``: a factory ``(store folder, sidecar path or None) -> ReportTwins | None`` of
  counterfactual reports (the report with exactly one finding attribute changed);
- ``detect``: ``store folder -> bool``, whether a store holds this kind of dataset.

Providers are registered by name (:func:`register_tasks`); the phantom (``"phantom"``,
:mod:`t3d_data.phantom.tasks`) is built in. :func:`tasks_for_store` picks the provider of a
store: the one named, or the first whose ``detect`` recognises the store (the phantom: its
findings sidecar lies next to the store or next to the manifest its studies were prepared from).
A task that needs a provider the store does not have fails with :class:`TasksError`, naming the
missing piece and the fix (:func:`require_tasks`, :meth:`DatasetTasks.require`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from t3d_data.errors import T3DDataError

__all__ = [
    "DatasetTasks",
    "ReportTwins",
    "TasksError",
    "available_tasks",
    "get_tasks",
    "register_tasks",
    "require_tasks",
    "tasks_for_store",
    "twin_reports",
]

#: The tasks :meth:`DatasetTasks.require` knows, and the field each one needs.
TASK_FIELDS = {"zero_shot": "zero_shot_prompts", "segmentation": "seg_classes",
               "twins": "twins"}


class TasksError(T3DDataError, ValueError):
    """A task needs dataset-provided data (prompts, classes, twins) that is not there."""


class ReportTwins(Protocol):
    """Counterfactual reports of the studies of one store.

    ``twin(study_id, rng)`` returns ``(twin report text, changed attribute)`` for a study the
    provider knows, or ``None`` for one it does not (that study gets no twins).
    """

    def twin(self, study_id: str, rng: np.random.Generator) -> tuple[str, str] | None: ...


@dataclass(frozen=True)
class DatasetTasks:
    """The evaluation tasks one kind of dataset provides (see the module docstring).

    Attributes:
        name: the registry name (e.g. ``"phantom"``; the tools' ``--tasks NAME``).
        zero_shot_prompts: ``{finding: {"positive": [str, ...], "negative": [str, ...]}}``.
        seg_classes: ``{class name: [label value, ...]}``, disjoint, values > 0.
        twins: ``(store, sidecar) -> ReportTwins | None`` or ``None`` (no twins).
        detect: ``store -> bool`` or ``None`` (only used when named).
        description: one line for listings and messages.
    """

    name: str
    zero_shot_prompts: Mapping[str, Mapping[str, Sequence[str]]] = field(default_factory=dict)
    seg_classes: Mapping[str, Sequence[int]] = field(default_factory=dict)
    twins: Callable[[Path, Path | None], ReportTwins | None] | None = None
    detect: Callable[[Path], bool] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        for finding, prompts in self.zero_shot_prompts.items():
            for side in ("positive", "negative"):
                texts = prompts.get(side) if isinstance(prompts, Mapping) else None
                if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                    raise ValueError(f"tasks {self.name!r}: zero_shot_prompts[{finding!r}] needs "
                                     f"a non-empty list of {side!r} prompt strings")
        seen: dict[int, str] = {}
        for cls, values in self.seg_classes.items():
            if not values:
                raise ValueError(f"tasks {self.name!r}: seg class {cls!r} has no label values")
            for v in values:
                if int(v) <= 0:
                    raise ValueError(f"tasks {self.name!r}: seg class {cls!r}: label value {v} "
                                     "must be > 0 (0 is background)")
                if int(v) in seen:
                    raise ValueError(f"tasks {self.name!r}: label value {v} is in both "
                                     f"{seen[int(v)]!r} and {cls!r}")
                seen[int(v)] = cls

    def prompts_for(self, finding_names: Iterable[str]) -> dict[str, dict[str, list[str]]]:
        """The prompts of the findings a store has, in this provider's order (maybe empty)."""
        have = set(finding_names)
        return {f: {"positive": list(p["positive"]), "negative": list(p["negative"])}
                for f, p in self.zero_shot_prompts.items() if f in have}

    def classes(self) -> dict[str, list[int]]:
        """``seg_classes`` as a plain ``{name: [int, ...]}`` dict (a copy)."""
        return {k: [int(v) for v in vs] for k, vs in self.seg_classes.items()}

    def report_twins(self, store: str | Path, sidecar: str | Path | None = None
                     ) -> ReportTwins | None:
        """The store's :class:`ReportTwins`, or ``None`` when this provider has none for it."""
        if self.twins is None:
            return None
        return self.twins(Path(store), Path(sidecar) if sidecar is not None else None)

    def require(self, task: str) -> DatasetTasks:
        """``self`` when it provides ``task`` (``"zero_shot"``, ``"segmentation"``,
        ``"twins"``); else :class:`TasksError` naming what is missing."""
        if task not in TASK_FIELDS:
            raise ValueError(f"task must be one of {sorted(TASK_FIELDS)}; got {task!r}")
        if not getattr(self, TASK_FIELDS[task]):
            raise TasksError(f"tasks {self.name!r} provide no {TASK_FIELDS[task]}, which "
                             f"{task} needs; give them in the DatasetTasks (register_tasks)")
        return self


_BUILTIN = {"phantom": "t3d_data.phantom.tasks:PHANTOM_TASKS"}
_REGISTRY: dict[str, DatasetTasks] = {}


def register_tasks(tasks: DatasetTasks, *, replace: bool = False) -> DatasetTasks:
    """Add a provider to the registry (``replace=True`` to overwrite a name)."""
    if not isinstance(tasks, DatasetTasks):
        raise TypeError(f"register_tasks takes a DatasetTasks; got {type(tasks).__name__}")
    if not replace and (tasks.name in _REGISTRY or tasks.name in _BUILTIN):
        raise ValueError(f"tasks {tasks.name!r} are already registered; pass replace=True")
    _REGISTRY[tasks.name] = tasks
    return tasks


def available_tasks() -> list[str]:
    """The registered provider names (built-in ones included), sorted."""
    return sorted({*_BUILTIN, *_REGISTRY})


def get_tasks(name: str) -> DatasetTasks:
    """The provider registered as ``name``.

    Raises:
        TasksError: no provider of that name (the message lists the known ones).
    """
    if name not in _REGISTRY and name in _BUILTIN:
        module, attr = _BUILTIN[name].split(":")
        _REGISTRY[name] = getattr(importlib.import_module(module), attr)
    if name not in _REGISTRY:
        raise TasksError(f"no dataset tasks named {name!r}; known: {', '.join(available_tasks())}"
                         " (add one with t3d_data.register_tasks)")
    return _REGISTRY[name]


def tasks_for_store(store: str | Path, name: str | None = None) -> DatasetTasks | None:
    """The provider of a store: ``name`` when given, else the first registered provider whose
    ``detect`` recognises the store, else ``None`` (a store with no dataset-provided tasks).

    Raises:
        TasksError: ``name`` is not registered.
    """
    if name is not None:
        return get_tasks(name)
    for known in available_tasks():
        tasks = get_tasks(known)
        if tasks.detect is not None and tasks.detect(Path(store)):
            return tasks
    return None


def require_tasks(store: str | Path, task: str, name: str | None = None) -> DatasetTasks:
    """:func:`tasks_for_store`, failing with one clear line when the store has no provider for
    ``task`` (``"zero_shot"``, ``"segmentation"``, ``"twins"``)."""
    tasks = tasks_for_store(store, name)
    if tasks is None:
        need = TASK_FIELDS.get(task, task)
        raise TasksError(f"store {store} has no dataset tasks, so {task} has no {need}; name a "
                         f"provider (--tasks NAME; known: {', '.join(available_tasks())}) or "
                         "register one with t3d_data.register_tasks")
    return tasks.require(task)


def twin_reports(twins: ReportTwins, study_ids: Sequence[str], per_study: int, seed: int
                 ) -> tuple[list[int], list[str], list[str]]:
    """``per_study`` twins of every study the provider knows.

    The twins of row ``r`` are drawn from ``np.random.default_rng([seed, r, 17])``.

    Returns:
        ``(rows, texts, attributes)``: the row of each twin's study in ``study_ids``, its text
        and the changed attribute.
    """
    rows: list[int] = []
    texts: list[str] = []
    attrs: list[str] = []
    for row, sid in enumerate(study_ids):
        rng = np.random.default_rng([seed, row, 17])
        for _ in range(per_study):
            got: Any = twins.twin(sid, rng)
            if got is None:
                break
            text, attr = got
            rows.append(row)
            texts.append(text)
            attrs.append(attr)
    return rows, texts, attrs
