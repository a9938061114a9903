#!/usr/bin/env python
"""The phantom benchmark: does T3D pre-training help downstream? Same budget for every arm.

    python tools/run_benchmark.py --preset smoke        # CPU, ~3 min: the pipeline end to end
    python tools/run_benchmark.py --preset cpu-small    # CPU, 15-25 min: tiny budgets, 1 seed
    python tools/run_benchmark.py --preset cpu-evidence # CPU, <= 2 h: 332 studies, 2 seeds, 95% CIs
    python tools/run_benchmark.py --preset gpu-evidence # one H200, <= 8 min (sized, not yet run)
    python tools/run_benchmark.py --preset full         # GPU-sized: more studies, steps, seeds

Pre-training arms run ``tools/pretrain.py`` as subprocesses (T3D = TCL + TIR + align, TCL only,
TIR only, align only (CLIP-style), T3D with a frozen text encoder); the "none" arm is the random
initialisation. Every arm is then scored in this process with the functions of
tools/evaluate.py (retrieval, report twins, zero-shot AUC), tools/finetune_cls.py (linear-probe
AUC) and tools/finetune_seg.py (SwinUNETR Dice at ``seg_fraction`` labels; "none" = scratch).
Every (arm, seed) also gets its held-out pretext losses (TCL and alignment on the test split,
eval mode, ``t3d_eval.pretext_losses``) and per-study values, from which percentile-bootstrap
95% intervals over test studies are computed (``t3d_eval.bootstrap_ci``; seeds pooled by
scoring the same resampled studies for every seed and averaging). Mean ± std over seeds
(``t3d_eval.aggregate_seeds``) goes to OUT/benchmark.{json,md}, the intervals to
OUT/intervals.json and the Markdown section (tables, comparisons, the exact command) to
OUT/summary.md. Only ``--update-docs`` writes that section into the preset's block of the
tracked docs/results.md (``--results-md PATH``: into another file). ``--reuse`` skips finished
pre-training runs and finished (arm, seed) scores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))

from t3d_tools.config import ConfigError, run_cli  # noqa: E402

#: Pre-training overrides of each arm (``None``: no pre-training). Same budget for all.
ARMS: dict[str, list[str] | None] = {
    "t3d": [],
    "tcl": ["objective.w_tir=0", "objective.w_align=0", "model.restoration=false"],
    "tir": ["objective.w_tcl=0", "objective.w_align=0"],
    "align": ["objective.w_tcl=0", "objective.w_tir=0", "model.restoration=false"],
    "t3d_frozen_text": ["model.text.freeze=true"],
    "none": None,
}

PRESETS: dict[str, dict[str, Any]] = {
    # The pipeline end to end in ~3 min on 2 shared CPU cores; the numbers mean nothing.
    "smoke": dict(arms=["t3d", "none"], seeds=[0], studies=12, shape=[64, 64, 64], steps=1,
                  batch_size=2, num_crops=2, lr=3e-4, seg_steps=1, seg_batch=1, seg_samples=1,
                  seg_fraction=0.1, seg_max_test=1, overlays=1, twins_per_study=2, threads=2),
    # Tiny budgets, one seed: a pre-training step of 4 crops takes ~30 s on 2 shared CPU cores,
    # so this is what fits in 15-25 min. Far too little to learn anything.
    "cpu-small": dict(arms=list(ARMS), seeds=[0], studies=24, shape=[64, 64, 64], steps=4,
                      batch_size=2, num_crops=2, lr=3e-4, seg_steps=4, seg_batch=1,
                      seg_samples=1, seg_fraction=0.1, seg_max_test=3, overlays=1,
                      twins_per_study=4, threads=2),
    # The evidence run on CPU (<= 2 h on 2 quiet cores; docs/results.md has the sizing): 332
    # studies give 230 train / 68 test (t3d_data.phantom.dataset.patient_plan); 96x96x64 volumes
    # so that two 64^3 crops of a study differ; 60 steps of 4 studies x 2 crops per seed (~20 s
    # a step); volumes embedded from 2 random crops; Dice on 32 test studies.
    "cpu-evidence": dict(arms=["t3d", "none"], seeds=[0, 1], studies=332, shape=[96, 96, 64],
                         steps=60, batch_size=4, num_crops=2, lr=1e-3, seg_steps=40, seg_batch=1,
                         seg_samples=1, seg_fraction=0.1, seg_max_test=32, overlays=1,
                         twins_per_study=4, threads=2,
                         embedding={"mode": "random", "num_crops": 2, "batch_size": 2}),
    # The same questions on one H200 in <= 8 min (sized by reasoning from docs/performance.md,
    # not yet run): 400 studies (287 train / 75 test), 200 steps of 8 studies x 4 crops in bf16
    # with 4 loader workers, 3 seeds, Dice on every test study after 200 steps.
    "gpu-evidence": dict(arms=["t3d", "none"], seeds=[0, 1, 2], studies=400, shape=[96, 96, 64],
                         steps=200, batch_size=8, num_crops=4, lr=1e-3, seg_steps=200, seg_batch=2,
                         seg_samples=2, seg_fraction=0.1, seg_max_test=None, overlays=1,
                         twins_per_study=4, threads=8, num_workers=4,
                         pretrain_sets=["run.mixed_precision=bf16"],
                         embedding={"mode": "sliding", "batch_size": 8}),
    # GPU-sized (one H100/H200-class GPU, several hours): native-size phantoms, 3 seeds.
    "full": dict(arms=list(ARMS), seeds=[0, 1, 2], studies=400, shape=None, steps=3000,
                 batch_size=8, num_crops=4, lr=2e-4, seg_steps=1000, seg_batch=2, seg_samples=2,
                 seg_fraction=0.1, seg_max_test=None, overlays=2, twins_per_study=4, threads=8),
}

SUMMARY_ROWS = [
    ("retrieval/v2r_recall@1", "v2r R@1"), ("retrieval/v2r_recall@5", "v2r R@5"),
    ("retrieval/r2v_recall@1", "r2v R@1"), ("retrieval/v2r_median_rank", "v2r median rank"),
    ("twin_accuracy/all", "twin acc (all)"), ("twin_accuracy/side", "twin acc (side)"),
    ("twin_accuracy/present", "twin acc (presence/negation)"),
    ("zero_shot_auc/macro", "zero-shot macro AUC"),
    ("linear_probe_auc/macro", "linear-probe macro AUC"),
    ("dice/mean", "Dice (mean of organs)"), ("pretrain_seconds", "pre-training time (s)"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smoke", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--arms", help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--seeds", help="comma-separated seeds (default: the preset's)")
    p.add_argument("--steps", type=int, help="pre-training steps per arm (default: the preset's)")
    p.add_argument("--out", type=Path, help="output folder (default runs/benchmark-PRESET)")
    p.add_argument("--update-docs", action="store_true",
                   help="also (re)write the preset's section of docs/results.md (tracked); by "
                        "default only OUT/summary.md is written")
    p.add_argument("--results-md", default=None,
                   help="Markdown file whose preset section is (re)written (default: none; "
                        "docs/results.md with --update-docs)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse pre-training runs of OUT that finished (RUN/summary.json) and "
                        "finished scores (OUT/runs/ARM-seedS.json with held-out losses + "
                        "ARM-seedS.per_study.json)")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    if args.preset not in PRESETS:
        raise ConfigError(f"--preset {args.preset!r}: unknown; valid presets: {', '.join(PRESETS)}")
    cfg = dict(PRESETS[args.preset], preset=args.preset)
    if args.arms:
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        bad = [a for a in arms if a not in ARMS]
        if bad or not arms:
            raise ConfigError(f"--arms: unknown arm(s) {bad}; valid arms: {', '.join(ARMS)}")
        cfg["arms"] = arms
    if args.seeds:
        try:
            cfg["seeds"] = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise ConfigError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps {args.steps}: must be >= 1")
        cfg["steps"] = args.steps
    cfg["out"] = args.out or ROOT / "runs" / f"benchmark-{args.preset}"
    if Path(cfg["out"]).exists() and not Path(cfg["out"]).is_dir():
        raise ConfigError(f"--out: {cfg['out']} is a file; pass a folder for the benchmark runs")
    md = args.results_md
    if md in (None, "none"):
        md = str(ROOT / "docs" / "results.md") if args.update_docs else None
    if md is not None and not Path(md).parent.is_dir():
        raise ConfigError(f"--results-md: folder {Path(md).parent} does not exist; pass a file in "
                          "an existing folder (or leave it out: OUT/summary.md is always written)")
    if md is not None and Path(md).is_dir():
        raise ConfigError(f"--results-md: {md} is a folder; pass a Markdown file")
    cfg["results_md"] = md
    return cfg


def cache_dir() -> Path:
    return Path(os.environ.get("T3D_CACHE_DIR", Path.home() / ".cache" / "t3d"))


def ensure_store(studies: int, shape: list[int] | None, seed: int = 0) -> Path:
    """Build (once, cached) a phantom dataset and its store: ``ROOT/phantom`` + ``ROOT/store``."""
    from t3d_data import prepare
    from t3d_data.phantom import generate_phantom_dataset

    tag = "native" if shape is None else "x".join(map(str, shape))
    root = cache_dir() / f"bench-phantom-n{studies}-{tag}-s{seed}"
    store = root / "store"
    if not (root / "ready").is_file():
        manifest = generate_phantom_dataset(root / "phantom", n_studies=studies, seed=seed,
                                            shape=None if shape is None else tuple(shape),
                                            progress=False)
        prepare(manifest, store, progress=False)
        (root / "ready").write_text("ok\n", encoding="utf-8")
    return store


def pretrain_command(cfg: dict[str, Any], arm: str, seed: int, store: Path,
                     run_dir: Path) -> list[str]:
    """The ``tools/pretrain.py`` command line of one arm (demo defaults + the arm's overrides)."""
    sets = [f"data.store={store}", f"run.output_dir={run_dir}", f"run.seed={seed}",
            f"data.crop.seed={seed}", f"optim.max_steps={cfg['steps']}", f"optim.lr={cfg['lr']}",
            f"optim.warmup_steps={cfg['steps'] // 10}", f"data.batch_size={cfg['batch_size']}",
            f"data.crop.num_crops={cfg['num_crops']}", "data.max_studies=null",  # every train study
            f"data.num_workers={cfg.get('num_workers', 0)}", "run.eval_split=null",
            "run.tensorboard=false", f"run.checkpoint_every={cfg['steps']}", "run.keep_last=1",
            *cfg.get("pretrain_sets", []), *(ARMS[arm] or [])]
    return [sys.executable, str(TOOLS / "pretrain.py"), *[a for s in sets for a in ("--set", s)]]


def pretrain(cfg: dict[str, Any], arm: str, seed: int, store: Path,
             reuse: bool) -> tuple[Path, float]:
    """Run (or reuse) one pre-training arm; returns ``(RUN/model, wall seconds)``."""
    run_dir = Path(cfg["out"]) / "pretrain" / f"{arm}-seed{seed}"
    timing = run_dir / "timing.json"
    if reuse and (run_dir / "summary.json").is_file() and (run_dir / "model").is_dir():
        seconds = json.loads(timing.read_text(encoding="utf-8"))["seconds"] if timing.is_file() else float("nan")
        return run_dir / "model", float(seconds)
    cmd = pretrain_command(cfg, arm, seed, store, run_dir)
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    log = run_dir.parent / f"{arm}-seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[benchmark] pre-training {arm} seed {seed} (its output: {log}): "
          f"{' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    tail = b""
    echo = getattr(sys.stderr, "buffer", None)
    with open(log, "wb", buffering=0) as out_f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out_f, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        while chunk := proc.stderr.read1(4096):  # live: pretrain.py's progress bar, warnings
            if echo is not None:
                echo.write(chunk)
                echo.flush()
            out_f.write(chunk)
            tail = (tail + chunk)[-3000:]
        code = proc.wait()
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"error: pre-training arm {arm!r} (seed {seed}) failed with exit code "
                         f"{code} (full output: {log}):\n"
                         f"{tail.decode('utf-8', errors='replace')}")
    timing.write_text(json.dumps({"seconds": seconds}) + "\n", encoding="utf-8")
    return run_dir / "model", seconds


def _load_tool(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"t3d_tool_{name}", TOOLS / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load tools/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: The weights of the objective that scores held-out pretext losses: no TIR (clean crops only).
PRETEXT_OBJECTIVE = dict(w_tir=0.0)
#: Fixed temperature of the second set of held-out losses, the same for every arm.
FIXED_TEMPERATURE = 0.07
#: Crop seed of the held-out batches: the same crops for every arm and seed.
PRETEXT_CROP_SEED = 0
#: No verdict from intervals over fewer test units than this (a bootstrap of a handful of
#: studies gives intervals of near-zero width that mean nothing).
MIN_UNITS = 8


def trained_temperatures(run_dir: Path | None) -> dict[str, float]:
    """The trained ``logit_scale`` of the TCL / alignment terms of a pre-training run.

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

    out = {}
    path = next(ckpts[-1] / n for n in names if (ckpts[-1] / n).is_file())
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            for term in ("tcl", "align"):
                if key == f"{term}.logit_scale" or key.endswith(f"objective.{term}.logit_scale"):
                    out[term] = float(f.get_tensor(key))
    return out


def pretext_objectives(run_dir: Path | None, device: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{"trained": objective with the run's temperatures, "fixed": τ = FIXED_TEMPERATURE}`` and
    the τ each term used. A term the arm did not train (and every term of ``none``) keeps the
    ``t3d`` objective preset's initial temperature, where training would have started."""
    import torch
    from t3d_objectives import T3DObjective

    scales = trained_temperatures(run_dir)
    trained = T3DObjective.from_preset("t3d", **PRETEXT_OBJECTIVE)
    fixed = T3DObjective.from_preset("t3d", **PRETEXT_OBJECTIVE, temperature=FIXED_TEMPERATURE,
                                     align_temperature=FIXED_TEMPERATURE)
    used: dict[str, Any] = {}
    with torch.no_grad():
        for term in ("tcl", "align"):
            loss = getattr(trained, term)
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

    prep = model.config.preprocessing  # held-out crops windowed as the model was trained
    crops = CropConfig(crop_size=tuple(model.config.vision.crop_size), hu_window=prep.hu_window,
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
    from t3d_tools.eval_config import (
        ClassifyConfig,
        EmbeddingSection,
        EvaluateConfig,
        ModelSection,
        RuntimeSection,
        SegmentationConfig,
    )

    runtime = RuntimeSection(threads=cfg["threads"], seed=seed)
    section = ModelSection(checkpoint=ckpt)  # the loaded model object is passed in as well
    embedding = EmbeddingSection(**cfg.get("embedding", {}))
    evaluate = _load_tool("evaluate")
    cls = _load_tool("finetune_cls")
    seg = _load_tool("finetune_seg")
    t0 = time.perf_counter()
    pretext, pretext_batches = heldout_pretext(cfg, model, None if ckpt is None else ckpt.parent,
                                               store, accelerator.device)
    ev_res = evaluate.evaluate(
        EvaluateConfig(model=section, store=store, twins_per_study=cfg["twins_per_study"],
                       embedding=embedding, runtime=runtime),
        model=model, accelerator=accelerator, write=False, per_study=True, progress=True)
    cls_res = cls.classify(ClassifyConfig(model=section, store=store, embedding=embedding,
                                          runtime=runtime), model=model, write=False,
                           per_study=True, progress=True)
    seg_cfg = SegmentationConfig(
        model=section, scratch=ckpt is None, store=store, label_fraction=cfg["seg_fraction"],
        steps=cfg["seg_steps"], batch_size=cfg["seg_batch"], samples_per_volume=cfg["seg_samples"],
        max_test=cfg["seg_max_test"], overlays=cfg["overlays"] if seed == cfg["seeds"][0] else 0,
        out=out, name=f"seg_{arm}-seed{seed}", runtime=runtime)
    seg_res = seg.segment(seg_cfg, source=model, write=True, per_study=True, progress=True)
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
def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def save_run(res: dict[str, Any], runs_dir: Path, name: str) -> None:
    """``RUNS/NAME.json`` (+ ``.md``) without the per-study values, which go to
    ``RUNS/NAME.per_study.json`` (NaN → null)."""
    import t3d_eval as ev

    ev.write_results({k: v for k, v in res.items() if k != "per_study"}, runs_dir, name)
    (runs_dir / f"{name}.per_study.json").write_text(
        json.dumps(_jsonable(res["per_study"]), allow_nan=False) + "\n", encoding="utf-8")


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
        for term in ("tcl_loss", "align_loss"):
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
        out["temperature"][arm] = {
            term: {"mean": sum(t[f"{term}_trained"] for t in temps) / len(temps),
                   "source": temps[0][f"{term}_trained_source"]} for term in ("tcl", "align")}
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
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = resolve(args)
    t_start = time.perf_counter()
    import t3d_eval as ev
    import torch
    from accelerate import Accelerator
    from t3d_models import T3DModel

    torch.set_num_threads(cfg["threads"])
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    store = ensure_store(cfg["studies"], cfg["shape"])
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    per_arm: dict[str, list[dict[str, Any]]] = {}
    timing = {"pretrain": 0.0, "downstream": 0.0, "bootstrap": 0.0}
    for arm in cfg["arms"]:
        for seed in cfg["seeds"]:
            name = f"{arm}-seed{seed}"
            res = load_run(out / "runs", name) if args.reuse else None
            if res is not None:
                print(f"[benchmark] reusing the scores of {name}", flush=True)
                per_arm.setdefault(arm, []).append(res)
                continue
            if ARMS[arm] is None:
                torch.manual_seed(seed)
                ckpt, seconds = None, 0.0
                model = T3DModel.from_preset("t3d-tiny-cpu").eval()
            else:
                t0 = time.perf_counter()
                ckpt, seconds = pretrain(cfg, arm, seed, store, args.reuse)
                timing["pretrain"] += time.perf_counter() - t0
                model = T3DModel.from_pretrained(ckpt).eval()
            print(f"[benchmark] downstream {arm} seed {seed}", flush=True)
            t0 = time.perf_counter()
            res = downstream(cfg, arm, seed, model, ckpt, store, accelerator, out)
            timing["downstream"] += time.perf_counter() - t0
            res["pretrain_seconds"] = seconds
            save_run(res, out / "runs", name)
            per_arm.setdefault(arm, []).append(res)
    agg = {arm: ev.aggregate_seeds([{k: v for k, v in r.items() if k != "per_study"}
                                    for r in runs]) for arm, runs in per_arm.items()}
    json_path, md_path = ev.write_results(agg, out, "benchmark")
    t0 = time.perf_counter()
    intervals = compute_intervals(per_arm)
    timing["bootstrap"] = time.perf_counter() - t0
    (out / "intervals.json").write_text(json.dumps(_jsonable(intervals), indent=2) + "\n",
                                        encoding="utf-8")
    seconds = time.perf_counter() - t_start
    shown = argv if argv is not None else sys.argv[1:]
    shown = [a for i, a in enumerate(shown)  # the docs command: no private output paths
             if a not in ("--results-md", "--update-docs")
             and (i == 0 or shown[i - 1] != "--results-md")]
    command = "uv run python tools/run_benchmark.py " + " ".join(shown)
    section = markdown_section(cfg, agg, command.strip(), seconds, intervals, timing)
    (out / "summary.md").write_text(section, encoding="utf-8")
    if cfg["results_md"] is not None:
        update_results_md(Path(cfg["results_md"]), cfg["preset"], section)
    print(section)
    print(f"wrote {json_path}, {md_path}, {out / 'intervals.json'}, {out / 'summary.md'}"
          + ("" if cfg["results_md"] is None else f" and {cfg['results_md']}")
          + ("" if cfg["results_md"] is not None else
             " (docs/results.md untouched; --update-docs writes this section there)"))
    return 0


if __name__ == "__main__":
    run_cli(main)
