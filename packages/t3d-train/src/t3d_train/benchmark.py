"""Scoring and reporting of the phantom benchmark (``tools/run_benchmark.py``).

Per (arm, seed): held-out pretext losses (:func:`heldout_pretext`), then retrieval, report
twins, zero-shot AUC, linear probe and segmentation (:func:`downstream`, through
:mod:`t3d_train.evaluation`, :mod:`~t3d_train.classification`, :mod:`~t3d_train.segmentation`),
saved per run for ``--reuse`` (:func:`save_run`, :func:`load_run`). Over the runs of every arm:
percentile-bootstrap intervals over test studies (:func:`compute_intervals`), the verdicts
(:func:`verdict`, :func:`chance_verdict`) and the Markdown section (:func:`markdown_section`,
:func:`update_results_md`). The script owns the presets, the arms and the pre-training
subprocesses.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from t3d_train.files import jsonable, write_text_atomic

#: ``(key, label)`` of the rows of the mean ± std table, in order.
SUMMARY_ROWS = [
    ("retrieval/v2r_recall@1", "v2r R@1"), ("retrieval/v2r_recall@5", "v2r R@5"),
    ("retrieval/r2v_recall@1", "r2v R@1"), ("retrieval/v2r_median_rank", "v2r median rank"),
    ("twin_accuracy/all", "twin acc (all)"), ("twin_accuracy/side", "twin acc (side)"),
    ("twin_accuracy/present", "twin acc (presence/negation)"),
    ("zero_shot_auc/macro", "zero-shot macro AUC"),
    ("linear_probe_auc/macro", "linear-probe macro AUC"),
    ("dice/mean", "Dice (mean of organs)"), ("pretrain_seconds", "pre-training time (s)"),
]

#: The weights of the objective that scores held-out pretext losses: no TIR (clean crops only).
PRETEXT_OBJECTIVE = dict(w_tir=0.0)


def pretext_terms() -> list[str]:
    """The logged keys of the terms scored on held-out crops (``t3d`` preset with
    :data:`PRETEXT_OBJECTIVE`, from the term registry): ``["tcl_loss", "align_loss"]``."""
    import dataclasses

    from t3d_objectives import PRESETS, term_names

    return term_names(dataclasses.replace(PRESETS["t3d"], **PRETEXT_OBJECTIVE))
#: Fixed temperature of the second set of held-out losses, the same for every arm.
FIXED_TEMPERATURE = 0.07
#: Crop seed of the held-out batches: the same crops for every arm and seed.
PRETEXT_CROP_SEED = 0
#: No verdict from intervals over fewer test units than this (a bootstrap of a handful of
#: studies gives intervals of near-zero width that mean nothing).
MIN_UNITS = 8


def trained_temperatures(run_dir: Path | None) -> dict[str, float]:
    """The trained ``logit_scale`` of each term of a pre-training run that has one (TCL and
    alignment; every term of the registry ``t3d_objectives.TERMS`` is looked for).

    Read from the newest complete ``RUN/checkpoints/step-*/objective.safetensors`` (the
    objective's tensors; in older checkpoints ``model.safetensors``, accelerate's state of the
    model + objective module). A term that the arm did not train (weight 0) has no entry.
    """
    if run_dir is None:
        return {}
    names = ("objective.safetensors", "model.safetensors")
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step-*")
                   if any((p / n).is_file() for n in names) and "tmp" not in p.name)
    if not ckpts:
        return {}
    from safetensors import safe_open
    from t3d_objectives import TERMS

    out = {}
    path = next(ckpts[-1] / n for n in names if (ckpts[-1] / n).is_file())
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            for t in TERMS.values():
                if key == f"{t.name}.logit_scale" or key.endswith(f"objective.{t.name}.logit_scale"):
                    out[t.name] = float(f.get_tensor(key))
    return out


def pretext_objectives(run_dir: Path | None, device: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{"trained": objective with the run's temperatures, "fixed": τ = FIXED_TEMPERATURE}`` and
    the τ each term used (each scored term with a ``logit_scale``: TCL and alignment). A term
    the arm did not train (and every term of ``none``) keeps the ``t3d`` objective preset's
    initial temperature, where training would have started."""
    import torch
    from t3d_objectives import TERMS, T3DObjective

    scales = trained_temperatures(run_dir)
    trained = T3DObjective.from_preset("t3d", **PRETEXT_OBJECTIVE)
    fixed = T3DObjective.from_preset("t3d", **PRETEXT_OBJECTIVE, temperature=FIXED_TEMPERATURE,
                                     align_temperature=FIXED_TEMPERATURE)
    used: dict[str, Any] = {}
    with torch.no_grad():
        for term in (t.name for t in TERMS.values() if t.key in trained.term_names):
            loss = getattr(trained, term)
            if not hasattr(loss, "logit_scale"):
                continue
            if term in scales:
                loss.logit_scale.fill_(scales[term])
            used[f"{term}_trained"] = 1.0 / float(loss.scale())
            used[f"{term}_trained_source"] = "checkpoint" if term in scales else "initial value"
    used["fixed"] = FIXED_TEMPERATURE
    return {"trained": trained.to(device), "fixed": fixed.to(device)}, used


def heldout_pretext(cfg: dict[str, Any], model: Any, run_dir: Path | None, store: Path,
                    device: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Held-out TCL and alignment losses on the test split: ``(summary, per-batch values)``."""
    import t3d_eval as ev
    from t3d_data import CropConfig, CropDataset

    from t3d_train.preprocessing import resolve_crop_size

    prep = model.config.preprocessing  # held-out crops windowed as the model was trained
    crops = CropConfig(crop_size=resolve_crop_size(None, model.config), hu_window=prep.hu_window,
                       pad_value=prep.pad_value, num_crops=cfg["num_crops"], seed=PRETEXT_CROP_SEED)
    dataset = CropDataset(store, crops, split="test")
    objectives, temps = pretext_objectives(run_dir, device)
    res = ev.pretext_losses(model.to(device), objectives, dataset,
                            min(cfg["batch_size"], len(dataset)), device=device)
    summary: dict[str, Any] = {"temperature": temps}
    per_batch: dict[str, Any] = {}
    for name, r in res.items():
        summary[name] = {k: v for k, v in r.items() if k not in ("per_batch", "study_ids")}
        per_batch[name] = r["per_batch"]
    per_batch["study_ids"] = next(iter(res.values()))["study_ids"]
    return summary, per_batch


def downstream(cfg: dict[str, Any], arm: str, seed: int, model: Any, ckpt: Path | None,
               store: Path, accelerator: Any, out: Path) -> dict[str, Any]:
    """Held-out pretext losses, retrieval + twins + zero-shot, linear probe and segmentation of
    one (arm, seed); ``"per_study"`` holds what the bootstrap intervals need."""
    from t3d_train.classification import classify
    from t3d_train.eval_config import (
        ClassifyConfig,
        EmbeddingSection,
        EvaluateConfig,
        ModelSection,
        RuntimeSection,
        SegmentationConfig,
    )
    from t3d_train.evaluation import evaluate
    from t3d_train.segmentation import segment

    runtime = RuntimeSection(threads=cfg["threads"], seed=seed)
    section = ModelSection(checkpoint=ckpt)  # the loaded model object is passed in as well
    embedding = EmbeddingSection(**cfg.get("embedding", {}))
    t0 = time.perf_counter()
    pretext, pretext_batches = heldout_pretext(cfg, model, None if ckpt is None else ckpt.parent,
                                               store, accelerator.device)
    ev_res = evaluate(
        EvaluateConfig(model=section, store=store, twins_per_study=cfg["twins_per_study"],
                       embedding=embedding, runtime=runtime),
        model=model, accelerator=accelerator, write=False, per_study=True, progress=True)
    cls_res = classify(ClassifyConfig(model=section, store=store, embedding=embedding,
                                      runtime=runtime), model=model, write=False,
                       per_study=True, progress=True)
    seg_cfg = SegmentationConfig(
        model=section, scratch=ckpt is None, store=store, label_fraction=cfg["seg_fraction"],
        steps=cfg["seg_steps"], batch_size=cfg["seg_batch"], samples_per_volume=cfg["seg_samples"],
        max_test=cfg["seg_max_test"], overlays=cfg["overlays"] if seed == cfg["seeds"][0] else 0,
        out=out, name=f"seg_{arm}-seed{seed}", runtime=runtime)
    seg_res = segment(seg_cfg, source=model, write=True, per_study=True, progress=True)
    return {
        "pretext": pretext,
        "retrieval": ev_res["retrieval"],
        "twin_accuracy": ev_res.get("twin_accuracy", {}),
        "zero_shot_auc": ev_res.get("zero_shot_auc", {}),
        "linear_probe_auc": cls_res["linear_probe_auc"],
        "dice": seg_res["dice"],
        "overlays": seg_res.get("overlays", []),
        "test_studies": ev_res["studies"],
        "seg_test_studies": seg_res["test_studies"],
        "seg_train_studies": seg_res["train_studies_used"],
        "eval_seconds": time.perf_counter() - t0,
        "per_study": {"retrieval": ev_res["per_study"], "probe": cls_res["per_study"],
                      "dice": seg_res["per_study"], "pretext": pretext_batches},
    }


# ---------------------------------------------------------------- per-run files and --reuse
def save_run(res: dict[str, Any], runs_dir: Path, name: str) -> None:
    """``RUNS/NAME.json`` (+ ``.md``) without the per-study values, which go to
    ``RUNS/NAME.per_study.json`` (NaN → null)."""
    import t3d_eval as ev

    ev.write_results({k: v for k, v in res.items() if k != "per_study"}, runs_dir, name)
    write_text_atomic(runs_dir / f"{name}.per_study.json",
                      json.dumps(jsonable(res["per_study"]), allow_nan=False) + "\n")


def load_run(runs_dir: Path, name: str) -> dict[str, Any] | None:
    """A finished (arm, seed) of this version of the script (``pretext`` + per-study values)."""
    import t3d_eval as ev

    path, per = runs_dir / f"{name}.json", runs_dir / f"{name}.per_study.json"
    if not (path.is_file() and per.is_file()):
        return None
    res = ev.read_results(path)
    if "pretext" not in res:
        return None
    res["per_study"] = json.loads(per.read_text(encoding="utf-8"))
    return res


# ---------------------------------------------------------------- bootstrap intervals
#: (key, label, higher is better) of the measures with intervals, in table order.
INTERVAL_ROWS = [
    ("pretext_trained/tcl_loss", "held-out TCL loss, trained τ", False),
    ("pretext_fixed/tcl_loss", f"held-out TCL loss, τ = {FIXED_TEMPERATURE}", False),
    ("pretext_trained/align_loss", "held-out alignment loss, trained τ", False),
    ("pretext_fixed/align_loss", f"held-out alignment loss, τ = {FIXED_TEMPERATURE}", False),
    ("v2r_recall@5", "v2r R@5", True),
    ("linear_probe_auc", "linear-probe macro AUC", True),
    ("dice", "Dice (mean of organs)", True),
]


def _float_array(x: Any) -> Any:
    import numpy as np

    return np.asarray([[math.nan if v is None else v for v in row] for row in x], dtype=float) \
        if x and isinstance(x[0], list) else np.asarray([math.nan if v is None else v for v in x],
                                                        dtype=float)


def interval_statistics(runs: list[dict[str, Any]]) -> dict[str, tuple[list[Any], Any]]:
    """Per measure: ``(units, statistic(idx))`` pooled over the seeds of one arm.

    Units are test studies (batches of test studies for the pretext losses); the statistic of
    a resample averages the metric over seeds, each seed scored on the same resampled units.
    """
    import numpy as np
    import t3d_eval as ev

    ps = [r["per_study"] for r in runs]
    stats: dict[str, tuple[list[Any], Any]] = {}
    for name in ("trained", "fixed"):
        units = [tuple(b) for b in ps[0]["pretext"]["study_ids"]]
        ev.check_same_units("pretext batches", [[tuple(b) for b in p["pretext"]["study_ids"]]
                                                for p in ps])
        for term in pretext_terms():
            if all(term in p["pretext"][name] for p in ps):
                m = np.stack([_float_array(p["pretext"][name][term]) for p in ps], axis=1)
                stats[f"pretext_{name}/{term}"] = (units, lambda i, m=m: float(np.nanmean(m[i])))
    ids = ps[0]["retrieval"]["study_ids"]
    ev.check_same_units("retrieval", [p["retrieval"]["study_ids"] for p in ps])
    hits = np.stack([_float_array(p["retrieval"]["v2r_rank"]) <= 5 for p in ps], axis=1)
    stats["v2r_recall@5"] = (ids, lambda i, h=hits: float(h[i].mean()))
    probe = [p["probe"] for p in ps]
    ev.check_same_units("linear probe", [q["study_ids"] for q in probe])
    labels = _float_array(probe[0]["labels"])
    names = [n for n in runs[0]["linear_probe_auc"] if n not in ("macro", "skipped")]
    skip = {names.index(n) for q in probe for n in q["untrainable"] if n in names}
    stats["linear_probe_auc"] = (probe[0]["study_ids"], ev.macro_auc_statistic(
        [_float_array(q["probs"]) for q in probe], labels, skip=skip))
    dice = [p["dice"] for p in ps]
    ev.check_same_units("segmentation", [d["study_ids"] for d in dice])
    stats["dice"] = (dice[0]["study_ids"], ev.class_mean_statistic(
        [_float_array(d["dice"]) for d in dice]))
    return stats


def recall_chance(groups: list[int], k: int) -> float:
    """Expected v2r R@k of random scores (``t3d_eval.chance_retrieval``): a query whose report
    group has g of the n studies finds one of them in the top k with probability
    1 - C(n-k, g) / C(n, g)."""
    if not groups:
        return math.nan
    from t3d_eval import chance_retrieval

    return chance_retrieval(groups, ks=(k,))[f"recall@{k}"]


def compute_intervals(per_arm: dict[str, list[dict[str, Any]]], n_resamples: int = 1000,
                      seed: int = 0) -> dict[str, Any]:
    """Bootstrap intervals per arm and measure, the paired differences ``arm - none``, the chance
    values and the spread between seeds. Every call uses the same resamples for the same
    number of units (``t3d_eval.bootstrap_ci``), so the arms' intervals are paired."""
    import numpy as np
    import t3d_eval as ev

    stats = {arm: interval_statistics(runs) for arm, runs in per_arm.items()}
    out: dict[str, Any] = {"arms": {}, "difference_vs_none": {}, "chance": {},
                           "n_resamples": n_resamples, "seed": seed, "units": {},
                           "temperature": {}}
    for arm, measures in stats.items():
        out["arms"][arm] = {}
        for key, (units, fn) in measures.items():
            ci = ev.bootstrap_ci(np.arange(len(units)), fn, n_resamples=n_resamples, seed=seed)
            row = ci.to_dict()
            row["seeds"] = _per_seed_values(per_arm[arm], key)
            out["arms"][arm][key] = row
            out["units"][key] = len(units)
    if "none" in stats:
        for arm, measures in stats.items():
            if arm == "none":
                continue
            out["difference_vs_none"][arm] = {}
            for key, (units, fn) in measures.items():
                if key not in stats["none"] or list(stats["none"][key][0]) != list(units):
                    continue
                base = stats["none"][key][1]
                ci = ev.bootstrap_ci(np.arange(len(units)), lambda i, a=fn, b=base: a(i) - b(i),
                                     n_resamples=n_resamples, seed=seed)
                out["difference_vs_none"][arm][key] = ci.to_dict()
    first = next(iter(per_arm.values()))[0]
    for name in ("trained", "fixed"):
        for term, value in first["pretext"][name]["chance"].items():
            out["chance"][f"pretext_{name}/{term}"] = value
    out["chance"]["v2r_recall@5"] = recall_chance(first["per_study"]["retrieval"]["group"], 5)
    out["chance"]["linear_probe_auc"] = 0.5
    for arm, runs in per_arm.items():  # the trained τ of each term, mean over seeds
        temps = [r["pretext"]["temperature"] for r in runs]
        terms = [k.removesuffix("_trained") for k in temps[0] if k.endswith("_trained")]
        out["temperature"][arm] = {
            term: {"mean": sum(t[f"{term}_trained"] for t in temps) / len(temps),
                   "source": temps[0][f"{term}_trained_source"]} for term in terms}
    return out


def _per_seed_values(runs: list[dict[str, Any]], key: str) -> list[float]:
    from t3d_eval import flatten_results

    flat_key = {"v2r_recall@5": "retrieval/v2r_recall@5", "linear_probe_auc":
                "linear_probe_auc/macro", "dice": "dice/mean"}.get(key)
    if flat_key is None:  # pretext_trained/tcl_loss -> pretext/trained/tcl_loss
        name, term = key.split("/")
        flat_key = f"pretext/{name.split('_', 1)[1]}/{term}"
    return [float(flatten_results(r).get(flat_key, math.nan)) for r in runs]


# ---------------------------------------------------------------- Markdown
def _cell(x: Any) -> str:
    from t3d_eval import MeanStd

    if isinstance(x, MeanStd):
        return "n/a" if x.mean != x.mean else f"{x.mean:.3f} ± {x.std:.3f}"
    return "–" if x is None else str(x)


def _ci_cell(row: dict[str, Any] | None) -> str:
    if row is None or row["estimate"] != row["estimate"]:
        return "n/a"
    cell = f"{row['estimate']:.3f} [{row['low']:.3f}, {row['high']:.3f}]"
    seeds = [v for v in row.get("seeds", []) if v == v]
    if len(seeds) > 1:
        mean = sum(seeds) / len(seeds)
        sd = math.sqrt(sum((v - mean) ** 2 for v in seeds) / (len(seeds) - 1))
        cell += f"; sd {sd:.3f}"
    return cell


def _chance_cell(key: str, value: float | None) -> str:
    if value is None or value != value:
        return "–"
    if key.endswith("_loss"):  # log(N - 1) or log(B)
        return f"log {round(math.exp(value))} = {value:.3f}"
    return f"{value:.3f}"


def verdict(a: dict[str, Any], b: dict[str, Any], higher_is_better: bool, units: int) -> str:
    """``a`` vs ``b`` from their intervals: better with non-overlapping intervals, better but
    overlapping (not evidence), or NOT better; no verdict under ``MIN_UNITS`` test units."""
    word = "higher" if higher_is_better else "lower"
    if units < MIN_UNITS:
        return f"only {units} test unit(s): no verdict, not evidence"
    sign = 1.0 if higher_is_better else -1.0
    ea, eb = sign * a["estimate"], sign * b["estimate"]
    if ea != ea or eb != eb:
        return "not measured (n/a)"
    separated = a["low"] > b["high"] if higher_is_better else a["high"] < b["low"]
    if ea > eb and separated:
        return f"{word} with non-overlapping intervals"
    if ea > eb:
        return f"{word}, overlapping intervals: not evidence"
    return f"NOT {word}"


def chance_verdict(row: dict[str, Any], chance: float, units: int) -> str:
    """A held-out loss against its chance value: below chance only if the interval excludes it."""
    if units < MIN_UNITS:
        return f"only {units} test unit(s): no verdict, not evidence"
    if row["estimate"] != row["estimate"] or chance != chance:
        return "not measured (n/a)"
    if row["high"] < chance:
        return "below chance (the interval excludes chance)"
    if row["estimate"] < chance:
        return "below chance, but the interval includes chance: not evidence"
    return "NOT below chance"


def interval_lines(cfg: dict[str, Any], intervals: dict[str, Any]) -> list[str]:
    """The table with 95% intervals and the comparison lines computed from it."""
    arms = list(intervals["arms"])
    units = intervals["units"]
    lines = ["", "95% intervals (percentile bootstrap, "
             f"{intervals['n_resamples']} resamples of the test units, seed {intervals['seed']}; "
             "seeds pooled: each resample scores the same units for every seed and averages over "
             "seeds; `sd` = spread of the per-seed values). Units: test studies; for the "
             "held-out losses, batches of "
             f"{cfg['batch_size']} test studies x {cfg['num_crops']} crops. ↓ lower is better.",
             "", "| measure | units | chance | " + " | ".join(arms) + " |",
             "|---|---|---|" + "---|" * len(arms)]
    for key, label, higher in INTERVAL_ROWS:
        if not any(key in intervals["arms"][a] for a in arms):
            continue
        cells = [_ci_cell(intervals["arms"][a].get(key)) for a in arms]
        chance = _chance_cell(key, intervals["chance"].get(key))
        lines.append(f"| {label}{'' if higher else ' ↓'} | {units.get(key, '–')} | {chance} | "
                     + " | ".join(cells) + " |")
    temps = intervals.get("temperature", {})
    if temps:
        def fmt(t: dict[str, Any]) -> str:
            return f"{t['mean']:.4f}" + ("" if t["source"] == "checkpoint" else " (initial)")

        lines += ["", "τ of the \"trained τ\" rows (TCL / alignment, mean over seeds; read from "
                  "the run's last checkpoint; \"(initial)\": a term the arm did not train keeps "
                  "the objective's initial τ): "
                  + "; ".join(f"{a} {fmt(t['tcl'])} / {fmt(t['align'])}"
                              for a, t in temps.items()) + "."]
    lines += ["", "Comparisons, as measured by this run:"]
    checks = []
    for arm in arms:
        if arm == "none":
            continue
        for key, label, higher in INTERVAL_ROWS:
            a, b = intervals["arms"][arm].get(key), intervals["arms"].get("none", {}).get(key)
            if a is None or b is None:
                continue
            diff = intervals["difference_vs_none"].get(arm, {}).get(key)
            extra = "" if diff is None else (f"; paired difference {diff['estimate']:+.3f} "
                                             f"[{diff['low']:+.3f}, {diff['high']:+.3f}]")
            checks.append(f"- {arm} vs none, {label}: {arm} {_ci_cell(a)} vs none "
                          f"{_ci_cell(b)}{extra} → {verdict(a, b, higher, units.get(key, 0))}.")
    for arm in arms:  # the trained-τ rows (for "none": the initial τ, = the fixed rows)
        for key, label, _ in INTERVAL_ROWS:
            row, chance = intervals["arms"][arm].get(key), intervals["chance"].get(key)
            if not key.startswith("pretext_trained") or row is None or chance is None:
                continue
            checks.append(f"- {arm}, {label} vs chance {chance:.3f}: {_ci_cell(row)} → "
                          f"{chance_verdict(row, chance, units.get(key, 0))}.")
    return lines + (checks or ["- (the arms needed for the comparisons were not run)"])


def _compare(flat: dict[str, dict[str, Any]], a: str, b: str, key: str, label: str) -> str | None:
    if a not in flat or b not in flat:
        return None
    x, y = flat[a].get(key), flat[b].get(key)
    if x is None or y is None or x.mean != x.mean or y.mean != y.mean:
        return f"- {label}: not measured (n/a)."
    if x.mean > y.mean + x.std + y.std and (x.std > 0 or y.std > 0):
        word = "higher, beyond one std of each"
    elif x.mean > y.mean:
        word = "higher (one seed or within the seed spread: not evidence)"
    elif x.mean == y.mean:
        word = "equal"
    else:
        word = "NOT higher"
    return f"- {label}: {a} {x.mean:.3f} vs {b} {y.mean:.3f} → {word}."


def markdown_section(cfg: dict[str, Any], agg: dict[str, Any], command: str,
                     seconds: float, intervals: dict[str, Any] | None = None,
                     timing: dict[str, float] | None = None) -> str:
    """The preset's block of docs/results.md: command, budget, tables, measured comparisons."""
    from t3d_eval import flatten_results

    arms = list(agg)
    flat = {a: flatten_results(agg[a]) for a in arms}
    shape = "x".join(map(str, cfg["shape"])) if cfg["shape"] else "native ~128x128x112"
    emb = cfg.get("embedding", {})
    emb_text = (f"{emb.get('num_crops', 4)} random crops" if emb.get("mode") == "random"
                else "a sliding window of crops")
    parts = ""
    if timing:
        parts = (f" (pre-training {timing['pretrain'] / 60:.1f} min, scoring "
                 f"{timing['downstream'] / 60:.1f} min, bootstrap {timing['bootstrap'] / 60:.1f} "
                 "min; reused runs count 0)")
    seg_test = flat[arms[0]].get("seg_test_studies")
    seg_n = f"{int(seg_test.mean)} test studies" if seg_test is not None else "the test studies"
    lines = [f"### Preset `{cfg['preset']}`", "", "```", command, "```", "",
             f"{len(cfg['seeds'])} seed(s) {cfg['seeds']}; {cfg['studies']} phantom studies "
             f"({shape} voxels); pre-training {cfg['steps']} steps x {cfg['batch_size']} studies x "
             f"{cfg['num_crops']} crops per arm (head lr {cfg['lr']:g}, warm-up "
             f"{cfg['steps'] // 10} steps); volumes embedded as the mean over {emb_text}; "
             f"segmentation {cfg['seg_steps']} steps at {cfg['seg_fraction']:.0%} labels, Dice on "
             f"{seg_n}; total wall clock {seconds / 60:.1f} min{parts}. "
             "Mean ± std over seeds (std 0 with one seed).", "",
             "| metric | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for key, label in SUMMARY_ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(flat[a].get(key)) for a in arms) + " |")
    tests = flat[arms[0]].get("test_studies")
    n_test = int(tests.mean) if tests is not None else 0
    lines += ["", f"{n_test} test studies (chance v2r R@1 ≈ {1 / max(n_test, 1):.2f}; chance AUC "
              "and twin accuracy 0.5)."]
    if intervals is not None:
        lines += interval_lines(cfg, intervals)
    else:
        lines += ["", "Comparisons, as measured by this run:"]
    checks = [
        _compare(flat, "t3d", "t3d_frozen_text", "twin_accuracy/side",
                 "T3D vs frozen text encoder, side twins (seed spread only)"),
        _compare(flat, "t3d", "t3d_frozen_text", "twin_accuracy/present",
                 "T3D vs frozen text encoder, presence/negation twins (seed spread only)"),
        _compare(flat, "t3d", "none", "retrieval/v2r_recall@1",
                 "T3D vs no pre-training, v2r R@1 (seed spread only)"),
    ]
    lines += [c for c in checks if c]
    return "\n".join(lines) + "\n"


def update_results_md(path: Path, preset: str, section: str) -> None:
    """Replace the preset's block between markers in ``path``, keeping everything else."""
    start, end = f"<!-- benchmark:{preset}:start -->", f"<!-- benchmark:{preset}:end -->"
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Results\n"
    block = f"{start}\n{section}{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
