#!/usr/bin/env python
"""The phantom benchmark: does T3D pre-training help downstream? Same budget for every arm.

    python tools/run_benchmark.py --preset smoke        # CPU, ~3 min: the pipeline end to end
    python tools/run_benchmark.py --preset cpu-small    # CPU, 15-25 min: tiny budgets, 1 seed
    python tools/run_benchmark.py --preset cpu-evidence # CPU, <= 2 h: 332 studies, 2 seeds, 95% CIs
    python tools/run_benchmark.py --preset gpu-evidence # one H200, <= 8 min (sized, not yet run)
    python tools/run_benchmark.py --preset full         # GPU-sized: more studies, steps, seeds

Pre-training arms run ``tools/pretrain.py`` as subprocesses (T3D = TCL + TIR + align, TCL only,
TIR only, align only (CLIP-style), T3D with a frozen text encoder); the "none" arm is the random
initialisation. Every arm is then scored in this process with the functions behind
tools/evaluate.py (``t3d_train.evaluation``: retrieval, report twins, zero-shot AUC),
tools/finetune_cls.py (``t3d_train.classification``: linear-probe AUC) and tools/finetune_seg.py
(``t3d_train.segmentation``: SwinUNETR Dice at ``seg_fraction`` labels; "none" = scratch).
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
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from t3d_train.benchmark import (
    compute_intervals,
    downstream,
    jsonable,
    load_run,
    markdown_section,
    save_run,
    update_results_md,
)
from t3d_train.config import ConfigError, run_cli
from t3d_train.files import write_text_atomic

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent

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
    write_text_atomic(out / "intervals.json", json.dumps(jsonable(intervals), indent=2) + "\n")
    seconds = time.perf_counter() - t_start
    shown = argv if argv is not None else sys.argv[1:]
    shown = [a for i, a in enumerate(shown)  # the docs command: no private output paths
             if a not in ("--results-md", "--update-docs")
             and (i == 0 or shown[i - 1] != "--results-md")]
    command = "uv run python tools/run_benchmark.py " + " ".join(shown)
    section = markdown_section(cfg, agg, command.strip(), seconds, intervals, timing)
    write_text_atomic(out / "summary.md", section)
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
