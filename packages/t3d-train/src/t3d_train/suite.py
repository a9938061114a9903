"""Frozen, versioned benchmark suites: data files in, CI-bearing JSON and Markdown out.

A suite (``t3d_train/suites/NAME.yaml``, shipped with the package) fixes everything that
decides a number: the dataset and its splits, the findings or classes, the prompt set, the
decision-threshold rule and the split it is chosen on, the label fractions and fine-tuning
budget, the embedding of a volume, the metrics and the bootstrap. ``tools/benchmark.py``
runs one against a checkpoint and a store (:func:`run_suite`), through the same functions as
the evaluation scripts (:func:`t3d_train.evaluation.evaluate`,
:func:`t3d_train.classification.classify`, :func:`t3d_train.segmentation.segment`; metrics
from ``t3d_eval``), and scores a random-init baseline of the same architecture in the same
run. Every metric gets a percentile-bootstrap 95% interval with **patient-level** resampling
(``t3d_eval.bootstrap_ci(..., clusters=patient ids)``); the output carries the suite name,
version and file hash, the preprocessing record, the checkpoint's sha256 (of its
``model.safetensors``), the store and the command. A store that lacks what the suite needs
(split, labels, masks) is refused with one line before torch is imported
(:func:`check_store_for`).

Kinds: ``zeroshot`` (AUC, F1 and balanced accuracy per finding and macro; thresholds chosen on
``splits.threshold`` only), ``retrieval`` (v2r / r2v Recall@K), ``segmentation`` (Dice per class
and mean, per label fraction; baseline = SwinUNETR from scratch) and ``classification``
(linear-probe AUC). Heavy imports happen inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from t3d_train.config import ConfigError, apply_overrides, format_validation_error
from t3d_train.eval_config import EmbeddingSection, ProbeSection
from t3d_train.files import jsonable, write_text_atomic

__all__ = [
    "Suite", "SuiteError", "available_suites", "check_store_for", "describe_suites",
    "docs_block", "load_suite", "markdown", "run_suite", "update_docs", "write_outputs",
]

_STRICT = ConfigDict(extra="forbid")

#: The metrics each kind of suite can report.
KIND_METRICS: dict[str, set[str]] = {
    "zeroshot": {"auc", "f1", "balanced_accuracy"},
    "classification": {"auc"},
    "segmentation": {"dice"},
    "retrieval": {f"{d}_recall@{k}" for d in ("v2r", "r2v") for k in (1, 5, 10)}
    | {"v2r_median_rank", "r2v_median_rank"},
}
#: Budget keys a run may override (``--set``); the output then says it is not the frozen suite.
OVERRIDABLE = ("finetune.", "label_fractions", "embedding.", "bootstrap.resamples")
#: The two arms of every run.
ARMS = ("checkpoint", "baseline")
ARM_TITLES = {"checkpoint": "checkpoint", "baseline": "random init (baseline)"}


class SuiteError(ConfigError):
    """A suite file that cannot be used, or a store that lacks what a suite needs."""


class Splits(BaseModel):
    """Split names in the store: ``test`` (scored), ``threshold`` (zero-shot decision
    thresholds are chosen here, never on ``test``), ``train`` (fine-tuning / probe)."""

    model_config = _STRICT
    test: str
    threshold: str | None = None
    train: str | None = None


class PromptPair(BaseModel):
    model_config = _STRICT
    positive: list[str] = Field(min_length=1)
    negative: list[str] = Field(min_length=1)


class Prompts(BaseModel):
    """Templates (``{finding}``: the label as written, ``{finding_lower}``: lower-cased) for
    every label, and/or fixed paraphrases ``per_label`` (these win)."""

    model_config = _STRICT
    positive: list[str] = []
    negative: list[str] = []
    per_label: dict[str, PromptPair] = {}

    def for_labels(self, labels: list[str]) -> dict[str, dict[str, list[str]]]:
        out = {}
        for label in labels:
            if label in self.per_label:
                pair = self.per_label[label]
                out[label] = {"positive": list(pair.positive), "negative": list(pair.negative)}
            else:
                fill = {"finding": label, "finding_lower": label.lower()}
                out[label] = {side: [t.format(**fill) for t in getattr(self, side)]
                              for side in ("positive", "negative")}
        return out


class Finetune(BaseModel):
    """The segmentation fine-tuning budget (see :class:`t3d_train.eval_config.SegmentationConfig`)."""

    model_config = _STRICT
    steps: int = Field(100, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(2, ge=1)
    samples_per_volume: int = Field(2, ge=1)
    roi_size: tuple[int, int, int] | None = None
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(2, ge=1)


class Bootstrap(BaseModel):
    model_config = _STRICT
    unit: Literal["patient"] = "patient"
    resamples: int = Field(1000, ge=1)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    seed: int = 0


class Suite(BaseModel):
    """One benchmark suite (the YAML's top level; unknown keys are errors)."""

    model_config = _STRICT
    name: str
    version: int = Field(ge=1)
    kind: Literal["zeroshot", "retrieval", "segmentation", "classification"]
    dataset: str
    description: str
    source: str
    splits: Splits
    metrics: list[str] = Field(min_length=1)
    labels: list[str] = []
    prompts: Prompts | None = None
    threshold_rule: Literal["youden", "f1"] = "youden"
    classes: dict[str, list[int]] | None = None
    tasks: str | None = None
    #: A ``finetune_seg --dataset`` preset (e.g. ``brats``: MR intensity policy, modality check),
    #: passed to :class:`t3d_train.eval_config.SegmentationConfig` as ``dataset``.
    seg_dataset: str | None = None
    label_fractions: list[float] = [1.0]
    finetune: Finetune = Field(default_factory=Finetune)
    probe: ProbeSection = Field(default_factory=ProbeSection)
    features: Literal["backbone", "embedding"] = "backbone"
    embedding: EmbeddingSection = Field(default_factory=EmbeddingSection)
    bootstrap: Bootstrap = Field(default_factory=Bootstrap)

    @model_validator(mode="after")
    def _consistent(self) -> Suite:
        bad = [m for m in self.metrics if m not in KIND_METRICS[self.kind]]
        if bad:
            raise ValueError(f"metrics {bad} are not {self.kind} metrics; choose from "
                             f"{sorted(KIND_METRICS[self.kind])}")
        if self.kind in ("zeroshot", "classification") and not self.labels:
            raise ValueError(f"a {self.kind} suite needs labels (the store's finding names)")
        if self.kind == "zeroshot":
            if self.prompts is None:
                raise ValueError("a zeroshot suite needs prompts")
            missing = [lab for lab in self.labels if lab not in self.prompts.per_label
                       and not (self.prompts.positive and self.prompts.negative)]
            if missing:
                raise ValueError(f"no prompts for {missing}: give positive/negative templates "
                                 "or per_label prompts")
            if {"f1", "balanced_accuracy"} & set(self.metrics) and not self.splits.threshold:
                raise ValueError("f1 / balanced_accuracy need splits.threshold (the split the "
                                 "decision thresholds are chosen on; never the test split)")
            if self.splits.threshold == self.splits.test:
                raise ValueError("splits.threshold must differ from splits.test")
        if self.kind in ("segmentation", "classification") and not self.splits.train:
            raise ValueError(f"a {self.kind} suite needs splits.train")
        if self.kind == "segmentation":
            if not self.label_fractions or not all(0 < f <= 1 for f in self.label_fractions):
                raise ValueError("label_fractions must be a non-empty list of values in (0, 1]")
        return self

    def prompt_set(self) -> dict[str, dict[str, list[str]]]:
        """``{label: {"positive": [...], "negative": [...]}}`` of every label, in order."""
        assert self.prompts is not None
        return self.prompts.for_labels(self.labels)

    def splits_needed(self) -> dict[str, str]:
        """``{role: split name}`` of every split this suite reads."""
        return {role: name for role, name in self.splits.model_dump().items() if name}


# --------------------------------------------------------------------------- finding a suite

def suites_dir() -> Path:
    """The folder of the shipped suite files (package data of t3d_train)."""
    return Path(str(resources.files("t3d_train") / "suites"))


def available_suites() -> list[str]:
    """The names of the shipped suites, sorted."""
    return sorted(p.stem for p in suites_dir().glob("*.yaml"))


def suite_path(name_or_path: str | Path) -> Path:
    """The YAML of a shipped suite name, or the given path to a suite file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise SuiteError(f"suite file {p} does not exist")
        return p
    found = suites_dir() / f"{name_or_path}.yaml"
    if not found.is_file():
        raise SuiteError(f"no suite named {str(name_or_path)!r}; known: "
                         f"{', '.join(available_suites())} (--list describes them)")
    return found


def load_suite(name_or_path: str | Path, overrides: list[str] | None = None
               ) -> tuple[Suite, dict[str, Any]]:
    """A validated :class:`Suite` and its provenance (file, sha256, overrides).

    ``overrides`` (``a.b=value``) may change only the budget keys of :data:`OVERRIDABLE`
    (e.g. ``finetune.steps=1`` in tests); the provenance lists them, and every output says the
    run is not the frozen suite.

    Raises:
        SuiteError: unknown suite, invalid YAML or field, a name that differs from the file
            name, or an override of a protocol key.
    """
    path = suite_path(name_or_path)
    raw = path.read_bytes()
    try:
        tree = yaml.safe_load(raw.decode("utf-8"))
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise SuiteError(f"{path}: the top level must be a mapping")
    overrides = list(overrides or [])
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not any(key == o or key.startswith(o) for o in OVERRIDABLE):
            raise SuiteError(f"--set {item!r}: only the budget may be overridden "
                             f"({', '.join(OVERRIDABLE)}); the rest of a suite is frozen "
                             "(write a new suite file or version)")
    apply_overrides(tree, overrides)
    try:
        suite = Suite.model_validate(tree)
    except ValidationError as exc:
        raise SuiteError(format_validation_error(exc, str(path))) from None
    if suite.name != path.stem:
        raise SuiteError(f"{path}: name {suite.name!r} differs from the file name {path.stem!r}")
    return suite, {"file": str(path), "sha256": hashlib.sha256(raw).hexdigest(),
                   "overrides": overrides}


def describe_suites() -> list[str]:
    """One line per shipped suite: ``name vN  kind  dataset  description``."""
    lines = []
    for name in available_suites():
        s, _ = load_suite(name)
        lines.append(f"{s.name:<24} v{s.version}  {s.kind:<14} {s.dataset:<12} "
                     f"{' '.join(s.description.split())}")
    return lines


# --------------------------------------------------------------------------- store checks

def check_store_for(suite: Suite, store: Path) -> dict[str, Any]:
    """Refuse, with one line, a store that lacks a split, label or mask the suite needs.

    Read from the store's ``index.json`` only (no torch). Returns the store's description for
    the output: path, ``index.json`` sha256, studies and patients per split used.

    Raises:
        SuiteError: what is missing and how to get it, in one line.
    """
    from t3d_data.store import VolumeStore

    from t3d_train.eval_common import check_store

    check_store(store)
    try:
        vs = VolumeStore(store)
    except Exception as err:  # noqa: BLE001 (a corrupt index: one line)
        raise SuiteError(f"store {store}: {err}") from None
    records = vs.records
    have_splits = sorted({str(r.split) for r in records})
    problems: list[str] = []
    per_split: dict[str, dict[str, int]] = {}
    for role, split in suite.splits_needed().items():
        rows = [r for r in records if r.split == split]
        if not rows:
            problems.append(f"no {split!r} split ({role}; the store has {have_splits})")
            continue
        per_split[split] = {"studies": len(rows), "patients": len({r.patient_id for r in rows})}
        if suite.kind in ("zeroshot", "classification"):
            missing = [lab for lab in suite.labels if lab not in vs.finding_names]
            if missing:
                problems.append(f"no labels {missing} (the store has {vs.finding_names or 'none'})")
            else:
                empty = [lab for lab in suite.labels if not any(lab in r.labels for r in rows)]
                if empty:
                    problems.append(f"no {split!r} study labelled for {empty}")
        if suite.kind == "segmentation":
            masked = sum(1 for r in rows if r.has_mask)
            if masked == 0:
                problems.append(f"no masks in the {split!r} split")
        if suite.kind == "retrieval" and len(rows) < 2:
            problems.append(f"{len(rows)} {split!r} study; retrieval needs at least 2")
    problems = list(dict.fromkeys(problems))
    if problems:
        raise SuiteError(f"store {store} cannot run suite {suite.name} v{suite.version} "
                         f"({suite.dataset}): {'; '.join(problems)}; prepare it from the "
                         f"dataset's import (docs/datasets.md) or pick the matching suite "
                         "(--list)")
    index = Path(store) / "index.json"
    return {"path": str(store), "index_sha256": _sha256(index), "splits": per_split}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_record(checkpoint: Path) -> dict[str, Any]:
    """Path and sha256 of a checkpoint's weights (``model.safetensors``)."""
    from t3d_models.io import WEIGHTS_NAME

    weights = Path(checkpoint) / WEIGHTS_NAME
    if not weights.is_file():
        raise SuiteError(f"checkpoint {checkpoint} has no {WEIGHTS_NAME}; pass the folder "
                         "written by save_pretrained (e.g. RUN/model)")
    return {"path": str(checkpoint), "weights": WEIGHTS_NAME, "sha256": _sha256(weights)}


# --------------------------------------------------------------------------- scoring

def _ci(values: Any, statistic: Any, patients: list[str], b: Bootstrap) -> dict[str, Any]:
    import t3d_eval as ev

    iv = ev.bootstrap_ci(values, statistic, clusters=patients, n_resamples=b.resamples,
                         confidence=b.confidence, seed=b.seed)
    return iv.to_dict()


def _patients(store: Path, study_ids: list[str]) -> list[str]:
    from t3d_data.store import VolumeStore

    of = {r.study_id: r.patient_id for r in VolumeStore(store).records}
    return [of[s] for s in study_ids]


def _eval_config(suite: Suite, store: Path, split: str, ckpt: Path | None, threads: int | None):
    from t3d_train.eval_config import EvaluateConfig, ModelSection, RuntimeSection

    return EvaluateConfig(model=ModelSection(checkpoint=ckpt), store=store, split=split,
                          embedding=suite.embedding, twins_per_study=0,
                          runtime=RuntimeSection(threads=threads, seed=suite.bootstrap.seed))


def score_zeroshot(suite: Suite, model: Any, store: Path, accelerator: Any,
                   threads: int | None, progress: bool) -> dict[str, Any]:
    """AUC, F1 and balanced accuracy per finding and macro, thresholds from ``splits.threshold``."""
    import numpy as np
    import t3d_eval as ev

    from t3d_train.evaluation import evaluate

    prompts = suite.prompt_set()
    runs = {}
    for role in ("threshold", "test"):
        split = getattr(suite.splits, role)
        if split is None:
            continue
        res = evaluate(_eval_config(suite, store, split, None, threads), model=model,
                       accelerator=accelerator, write=False, per_study=True, progress=progress,
                       prompts=prompts)
        runs[role] = res["per_study"]
    test = runs["test"]
    names = test["zero_shot"]["findings"]
    s = np.asarray(test["zero_shot"]["scores"], dtype=float)
    y = np.asarray(test["zero_shot"]["labels"], dtype=float)
    patients = _patients(store, test["study_ids"])
    b = suite.bootstrap
    units = np.arange(len(patients))
    metrics: dict[str, Any] = {}
    thresholds = None
    if "threshold" in runs:
        tz = runs["threshold"]["zero_shot"]
        thresholds = ev.operating_thresholds(np.asarray(tz["scores"], dtype=float),
                                             np.asarray(tz["labels"], dtype=float),
                                             suite.threshold_rule)
    if "auc" in suite.metrics:
        metrics["macro AUC"] = _ci(units, ev.macro_auc_statistic(s, y), patients, b)
    for key, title in (("f1", "F1"), ("balanced_accuracy", "balanced accuracy")):
        if key in suite.metrics:
            # the macro is over the findings scored on the whole test split; a resample that
            # lacks a class of one of them is undefined (skipped), as for the macro AUC
            valid = np.isfinite(ev.threshold_metrics(s, y, thresholds)[key])

            def macro(idx: Any, key: str = key, valid: Any = valid) -> float:
                v = ev.threshold_metrics(s[idx], y[idx], thresholds)[key][valid]
                return float(v.mean()) if v.size and np.isfinite(v).all() else math.nan
            metrics[f"macro {title}"] = _ci(units, macro, patients, b)
    for j, name in enumerate(names):
        if "auc" in suite.metrics:
            def auc(idx: Any, j: int = j) -> float:
                return ev.binary_auc(s[idx, j], y[idx, j])
            metrics[f"{name} AUC"] = _ci(units, auc, patients, b)
        for key, title in (("f1", "F1"), ("balanced_accuracy", "balanced accuracy")):
            if key in suite.metrics:
                def one(idx: Any, j: int = j, key: str = key) -> float:
                    return float(ev.threshold_metrics(s[idx, j:j + 1], y[idx, j:j + 1],
                                                      thresholds[j:j + 1])[key][0])
                metrics[f"{name} {title}"] = _ci(units, one, patients, b)
    out: dict[str, Any] = {"metrics": metrics, "test_studies": len(patients),
                           "test_patients": len(set(patients))}
    if thresholds is not None:
        out["thresholds"] = {"split": suite.splits.threshold, "rule": suite.threshold_rule,
                             "values": dict(zip(names, thresholds.tolist(), strict=True)),
                             "studies": len(runs["threshold"]["study_ids"])}
    return out


def score_retrieval(suite: Suite, model: Any, store: Path, accelerator: Any,
                    threads: int | None, progress: bool) -> dict[str, Any]:
    """v2r / r2v Recall@K (and median rank) over the test split, CIs over patients."""
    import numpy as np

    from t3d_train.evaluation import evaluate

    res = evaluate(_eval_config(suite, store, suite.splits.test, None, threads), model=model,
                   accelerator=accelerator, write=False, per_study=True, progress=progress)
    per = res["per_study"]
    patients = _patients(store, per["study_ids"])
    metrics: dict[str, Any] = {}
    for m in suite.metrics:
        direction, what = m.split("_", 1)
        ranks = np.asarray(per[f"{direction}_rank"], dtype=float)
        if what == "median_rank":
            metrics[m] = _ci(ranks, lambda r: float(np.median(r)), patients, suite.bootstrap)
        else:
            k = int(what.split("@")[1])
            metrics[m] = _ci((ranks <= k).astype(float), None, patients, suite.bootstrap)
            metrics[m]["check"] = res["retrieval"][m]  # the evaluation's own number
    return {"metrics": metrics, "test_studies": len(patients),
            "test_patients": len(set(patients)), "chance": res["chance"]["retrieval"]}


def score_classification(suite: Suite, model: Any, store: Path, threads: int | None,
                         progress: bool) -> dict[str, Any]:
    """Linear-probe AUC per finding and macro on the test split, CIs over patients."""
    import numpy as np
    import t3d_eval as ev

    from t3d_train.classification import classify
    from t3d_train.eval_config import ClassifyConfig, RuntimeSection

    cfg = ClassifyConfig(store=store, train_split=suite.splits.train, test_split=suite.splits.test,
                         features=suite.features, embedding=suite.embedding, probe=suite.probe,
                         runtime=RuntimeSection(threads=threads, seed=suite.bootstrap.seed))
    res = classify(cfg, model=model, write=False, per_study=True, progress=progress)
    per = res["per_study"]
    from t3d_data.store import VolumeStore

    names = list(VolumeStore(store).finding_names)
    cols = [names.index(lab) for lab in suite.labels]
    p = np.asarray(per["probs"], dtype=float)[:, cols]
    y = np.asarray(per["labels"], dtype=float)[:, cols]
    skip = [k for k, lab in enumerate(suite.labels) if lab in per["untrainable"]]
    patients = _patients(store, per["study_ids"])
    units = np.arange(len(patients))
    metrics = {"macro AUC": _ci(units, ev.macro_auc_statistic(p, y, skip), patients,
                                suite.bootstrap)}
    for j, lab in enumerate(suite.labels):
        def auc(idx: Any, j: int = j) -> float:
            return math.nan if j in skip else ev.binary_auc(p[idx, j], y[idx, j])
        metrics[f"{lab} AUC"] = _ci(units, auc, patients, suite.bootstrap)
    return {"metrics": metrics, "test_studies": len(patients),
            "test_patients": len(set(patients)), "train_studies": res["train_studies"],
            "untrainable": per["untrainable"]}


def score_segmentation(suite: Suite, checkpoint: Path, scratch: bool, store: Path,
                       threads: int | None, progress: bool) -> dict[str, Any]:
    """Dice per class and mean at every label fraction, CIs over patients."""
    import numpy as np
    import t3d_eval as ev

    from t3d_train.eval_config import ModelSection, RuntimeSection, SegmentationConfig
    from t3d_train.segmentation import segment

    metrics: dict[str, Any] = {}
    used: dict[str, Any] = {}
    patients: list[str] = []
    ft = suite.finetune
    for fraction in suite.label_fractions:
        extra = {"dataset": suite.seg_dataset} if suite.seg_dataset else {}
        cfg = SegmentationConfig(
            **extra, model=ModelSection(checkpoint=checkpoint), scratch=scratch, store=store,
            train_split=suite.splits.train, test_split=suite.splits.test, classes=suite.classes,
            tasks=suite.tasks, label_fraction=fraction, steps=ft.steps, lr=ft.lr,
            batch_size=ft.batch_size, samples_per_volume=ft.samples_per_volume,
            roi_size=ft.roi_size, overlap=ft.overlap, sw_batch_size=ft.sw_batch_size,
            overlays=0, runtime=RuntimeSection(threads=threads, seed=suite.bootstrap.seed))
        res = segment(cfg, write=False, per_study=True, progress=progress)
        per = res["per_study"]
        rows = np.asarray([[math.nan if v is None else v for v in r] for r in per["dice"]],
                          dtype=float)
        patients = _patients(store, per["study_ids"])
        classes = list(res["config"]["classes"])
        tag = f"{fraction:.0%}"
        metrics[f"mean Dice @ {tag}"] = _ci(np.arange(len(rows)),
                                            ev.class_mean_statistic(rows), patients,
                                            suite.bootstrap)
        for c, name in enumerate(classes):
            col = rows[:, c]
            metrics[f"{name} Dice @ {tag}"] = _ci(col, None, patients, suite.bootstrap)
        used[tag] = {"train_studies_used": res["train_studies_used"],
                     "train_studies_labelled": res["train_studies_labelled"],
                     "final_loss": res["final_loss"]}
    return {"metrics": metrics, "test_studies": len(patients),
            "test_patients": len(set(patients)), "fractions": used}


def _random_init(config: Any, seed: int) -> Any:
    """The checkpoint's architecture with random vision weights (text: the preset's encoder)."""
    import torch
    from t3d_models import T3DModel

    torch.manual_seed(seed)
    return T3DModel(config).eval()


def run_suite(suite: Suite, provenance: dict[str, Any], checkpoint: Path, store: Path,
              out: Path, *, baseline: bool = True, command: str = "",
              threads: int | None = 2, progress: bool = False) -> dict[str, Any]:
    """Score ``checkpoint`` (and, with ``baseline``, a random-init model of its architecture)
    on ``store`` by the suite's protocol; write ``OUT/NAME.json`` and ``OUT/NAME.md``.

    Raises:
        SuiteError: the store lacks what the suite needs, or the checkpoint its weights.
    """
    from t3d_train.eval_common import check_checkpoint, model_config, set_threads
    from t3d_train.eval_config import ModelSection

    store, checkpoint, out = Path(store), Path(checkpoint), Path(out)
    check_checkpoint(ModelSection(checkpoint=checkpoint))
    if out.exists() and not out.is_dir():
        raise SuiteError(f"out: {out} is a file; pass a folder for the results")
    store_info = check_store_for(suite, store)  # before torch
    ckpt_info = checkpoint_record(checkpoint)
    start = time.time()
    import torch

    set_threads(threads)
    config = model_config(ModelSection(checkpoint=checkpoint))
    arms: dict[str, Any] = {}
    for arm in ARMS if baseline else ARMS[:1]:
        t0 = time.time()
        if suite.kind == "segmentation":
            res = score_segmentation(suite, checkpoint, arm == "baseline", store, threads,
                                     progress)
        else:
            from t3d_models import T3DModel

            model = (T3DModel.from_pretrained(checkpoint).eval() if arm == "checkpoint"
                     else _random_init(config, suite.bootstrap.seed))
            if suite.kind == "classification":
                res = score_classification(suite, model, store, threads, progress)
            else:
                from accelerate import Accelerator

                acc = Accelerator(cpu=not torch.cuda.is_available())
                score = score_zeroshot if suite.kind == "zeroshot" else score_retrieval
                res = score(suite, model, store, acc, threads, progress)
        res["seconds"] = round(time.time() - t0, 1)
        arms[arm] = res
    results = {
        "suite": {"name": suite.name, "version": suite.version, "kind": suite.kind,
                  "dataset": suite.dataset, "frozen": not provenance["overrides"],
                  **provenance, "definition": suite.model_dump(mode="json")},
        "checkpoint": ckpt_info,
        "baseline": ({"init": "random", "seed": suite.bootstrap.seed,
                      "what": ("SwinUNETR from scratch (MONAI init) of the checkpoint's "
                               "architecture" if suite.kind == "segmentation" else
                               "the checkpoint's architecture with random vision weights "
                               "(text tower: its off-the-shelf encoder)")}
                     if baseline else None),
        "store": store_info,
        "preprocessing": config.preprocessing_record(),
        "bootstrap": {**suite.bootstrap.model_dump(), "method": "percentile",
                      "resampled": "patients (every study of a drawn patient)"},
        "command": command,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": threads,
        "seconds": round(time.time() - start, 1),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "arms": arms,
    }
    write_outputs(results, out)
    return results


# --------------------------------------------------------------------------- outputs

def cell(row: dict[str, Any] | None) -> str:
    """``0.612 [0.501, 0.733]``, ``n/a`` for an undefined metric."""
    if row is None:
        return ""
    e, lo, hi = (row.get(k) for k in ("estimate", "low", "high"))
    if e is None or (isinstance(e, float) and not math.isfinite(e)):
        return "n/a"
    if lo is None or (isinstance(lo, float) and not math.isfinite(lo)):
        return f"{e:.3f} [n/a]"
    return f"{e:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown(results: dict[str, Any]) -> str:
    """The run's Markdown: what was run on what, then one row per metric, one column per arm."""
    s = results["suite"]
    arms = [a for a in ARMS if a in results["arms"]]
    first = results["arms"][arms[0]]
    pre = results["preprocessing"]
    lines = [f"### Suite `{s['name']}` v{s['version']} ({s['dataset']}, {s['kind']})", ""]
    if not s["frozen"]:
        lines += [f"**Not the frozen suite**: overridden {', '.join(s['overrides'])}; these "
                  "numbers are not comparable with the suite's.", ""]
    lines += [
        " ".join(s["definition"]["description"].split()), "",
        f"- command: `{results['command']}`" if results["command"] else "- command: (library call)",
        f"- checkpoint: `{results['checkpoint']['path']}` (sha256 of "
        f"{results['checkpoint']['weights']}: `{results['checkpoint']['sha256'][:16]}…`)",
        f"- store: `{results['store']['path']}`; "
        + ", ".join(f"{k}: {v['studies']} studies of {v['patients']} patients"
                    for k, v in results["store"]["splits"].items()),
        f"- preprocessing: HU window {list(pre.get('hu_window', []))}, crop "
        f"{list(pre.get('crop_size', []))}, {pre.get('orientation')}, spacing "
        f"{pre.get('spacing')}, {pre.get('intensity')}",
        f"- 95% intervals: percentile bootstrap, {results['bootstrap']['resamples']} resamples of "
        f"the {first['test_patients']} test patients (all their studies), seed "
        f"{results['bootstrap']['seed']}; {results['device']}, {results['seconds']:.0f} s, "
        f"{results['date']}",
    ]
    if "thresholds" in first:
        t = first["thresholds"]
        lines.append(f"- F1 / balanced accuracy at {t['rule']} thresholds chosen on the "
                     f"{t['split']!r} split ({t['studies']} studies), never on the test split")
    if results.get("baseline"):
        lines.append(f"- baseline: {results['baseline']['what']}, seed {results['baseline']['seed']}")
    lines += ["", "| metric | " + " | ".join(ARM_TITLES[a] for a in arms) + " |",
              "|---|" + "---|" * len(arms)]
    for m in first["metrics"]:
        lines.append(f"| {m} | " + " | ".join(cell(results["arms"][a]["metrics"].get(m))
                                              for a in arms) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``OUT/NAME.json`` (strict JSON, NaN → null) and ``OUT/NAME.md``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    name = results["suite"]["name"]
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    write_text_atomic(json_path, json.dumps(jsonable(results), indent=2, allow_nan=False))
    write_text_atomic(md_path, markdown(results))
    return json_path, md_path


#: The docs/results.md columns of each kind (metric keys of the run's table).
def summary_columns(suite: Suite) -> list[str]:
    """The headline metrics of a suite's docs/results.md table."""
    if suite.kind == "zeroshot":
        titles = {"auc": "macro AUC", "f1": "macro F1", "balanced_accuracy": "macro balanced accuracy"}
        return [titles[m] for m in suite.metrics]
    if suite.kind == "classification":
        return ["macro AUC"]
    if suite.kind == "segmentation":
        return [f"mean Dice @ {f:.0%}" for f in suite.label_fractions]
    return list(suite.metrics)


def docs_block(suite: Suite, results: dict[str, Any] | None = None) -> str:
    """The suite's docs/results.md block: a table with a measured row per arm of ``results``,
    or rows of empty cells to be filled by a run on the real data."""
    cols = summary_columns(suite)
    head = [f"#### `{suite.name}` v{suite.version} — {suite.dataset}", "",
            " ".join(suite.description.split()), ""]
    table = ["| data | model | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    if results is None:
        what = ("not run yet" if suite.dataset == "phantom"
                else f"needs the real dataset ({suite.source})")
        head.append(f"**Not measured here**: {what}; the empty cells are for a run of "
                    f"`python tools/benchmark.py {suite.name} --checkpoint RUN/model --store "
                    "STORE --update-docs`. No number is borrowed from a paper.")
        head.append("")
        for arm in ARMS:
            table.append(f"| {suite.dataset} | {ARM_TITLES[arm]} | " + " | ".join(
                "" for _ in cols) + " |")
        return "\n".join(head + table) + "\n"
    store = results["store"]
    test = results["arms"]["checkpoint"]
    head.append(f"**Measured here** ({results['date']}, {results['device']}, "
                f"{results['seconds']:.0f} s) with `{results['command']}`: checkpoint "
                f"`{results['checkpoint']['path']}` (sha256 `{results['checkpoint']['sha256'][:12]}…`),"
                f" {test['test_studies']} test studies of {test['test_patients']} patients; "
                "95% patient-bootstrap intervals.")
    head.append("")
    label = f"{suite.dataset} (`{Path(store['path']).parent.name or store['path']}`)"
    for arm in ARMS:
        if arm in results["arms"]:
            m = results["arms"][arm]["metrics"]
            table.append(f"| {label} | {ARM_TITLES[arm]} | "
                         + " | ".join(cell(m.get(c)) for c in cols) + " |")
    chance = test.get("chance")
    if suite.kind == "retrieval" and chance:  # t3d_eval.chance_retrieval of the run's reports
        table.append(f"| {label} | chance (random scores) | " + " | ".join(
            f"{chance.get(c.split('_', 1)[1], float('nan')):.3f}" for c in cols) + " |")
    return "\n".join(head + table) + "\n"


_MARK = "<!-- suite:{name}:{end} -->"


def update_docs(path: Path, suite: Suite, block: str) -> None:
    """Replace the suite's block between its markers in ``path`` (appended if absent)."""
    start, end = _MARK.format(name=suite.name, end="start"), _MARK.format(name=suite.name, end="end")
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Results\n"
    new = f"{start}\n{block}{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + new + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    write_text_atomic(path, text)


def plain_command(argv: list[str]) -> str:
    """The command line as a user would type it (``python tools/benchmark.py ...``)."""
    import shlex

    return "python tools/benchmark.py " + shlex.join(argv)

