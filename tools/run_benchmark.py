#!/usr/bin/env python
"""The phantom benchmark: does T3D pre-training help downstream? Same budget for every arm.

    python tools/run_benchmark.py --preset smoke        # CPU, ~3 min: the pipeline end to end
    python tools/run_benchmark.py --preset cpu-small    # CPU, 15-25 min: tiny budgets, 1 seed
    python tools/run_benchmark.py --preset full         # GPU-sized: more studies, steps, seeds

Pre-training arms run ``tools/pretrain.py`` as subprocesses (T3D = TCL + TIR + align, TCL only,
TIR only, align only (CLIP-style), T3D with a frozen text encoder); the "none" arm is the random
initialisation. Every arm is then scored in this process with the functions of
tools/evaluate.py (retrieval, report twins, zero-shot AUC), tools/finetune_cls.py (linear-probe
AUC) and tools/finetune_seg.py (SwinUNETR Dice at ``seg_fraction`` labels; "none" = scratch).
Mean ± std over seeds (``t3d_eval.aggregate_seeds``) goes to OUT/benchmark.{json,md} and into
the preset's section of docs/results.md, together with the exact command.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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
    p.add_argument("--results-md", default=str(ROOT / "docs" / "results.md"),
                   help="Markdown file whose preset section is (re)written; 'none' to skip")
    p.add_argument("--reuse", action="store_true",
                   help="reuse pre-training runs of OUT that finished (RUN/summary.json)")
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
            f"data.crop.num_crops={cfg['num_crops']}", "data.num_workers=0", "run.eval_split=null",
            "run.tensorboard=false", f"run.checkpoint_every={cfg['steps']}", "run.keep_last=1",
            *(ARMS[arm] or [])]
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
    print(f"[benchmark] pre-training {arm} seed {seed}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace")
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"error: pre-training arm {arm!r} (seed {seed}) failed with exit code "
                         f"{res.returncode}:\n{res.stderr[-3000:]}")
    timing.write_text(json.dumps({"seconds": seconds}) + "\n", encoding="utf-8")
    return run_dir / "model", seconds


def _load_tool(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"t3d_tool_{name}", TOOLS / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load tools/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def downstream(cfg: dict[str, Any], arm: str, seed: int, model: Any, ckpt: Path | None,
               store: Path, accelerator: Any, out: Path) -> dict[str, Any]:
    """Retrieval + twins + zero-shot, linear probe and segmentation of one (arm, seed)."""
    from t3d_tools.eval_config import (
        ClassifyConfig,
        EvaluateConfig,
        ModelSection,
        RuntimeSection,
        SegmentationConfig,
    )

    runtime = RuntimeSection(threads=cfg["threads"], seed=seed)
    section = ModelSection(checkpoint=ckpt)  # the loaded model object is passed in as well
    evaluate = _load_tool("evaluate")
    cls = _load_tool("finetune_cls")
    seg = _load_tool("finetune_seg")
    t0 = time.perf_counter()
    ev_res = evaluate.evaluate(
        EvaluateConfig(model=section, store=store, twins_per_study=cfg["twins_per_study"],
                       runtime=runtime), model=model, accelerator=accelerator, write=False)
    cls_res = cls.classify(ClassifyConfig(model=section, store=store, runtime=runtime),
                           model=model, write=False)
    seg_cfg = SegmentationConfig(
        model=section, scratch=ckpt is None, store=store, label_fraction=cfg["seg_fraction"],
        steps=cfg["seg_steps"], batch_size=cfg["seg_batch"], samples_per_volume=cfg["seg_samples"],
        max_test=cfg["seg_max_test"], overlays=cfg["overlays"] if seed == cfg["seeds"][0] else 0,
        out=out, name=f"seg_{arm}-seed{seed}", runtime=runtime)
    seg_res = seg.segment(seg_cfg, source=model, write=True)
    return {
        "retrieval": ev_res["retrieval"],
        "twin_accuracy": ev_res.get("twin_accuracy", {}),
        "zero_shot_auc": ev_res.get("zero_shot_auc", {}),
        "linear_probe_auc": cls_res["linear_probe_auc"],
        "dice": seg_res["dice"],
        "overlays": seg_res.get("overlays", []),
        "test_studies": ev_res["studies"],
        "seg_train_studies": seg_res["train_studies_used"],
        "eval_seconds": time.perf_counter() - t0,
    }


def _cell(x: Any) -> str:
    from t3d_eval import MeanStd

    if isinstance(x, MeanStd):
        return "n/a" if x.mean != x.mean else f"{x.mean:.3f} ± {x.std:.3f}"
    return "–" if x is None else str(x)


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
                     seconds: float) -> str:
    """The preset's block of docs/results.md: command, budget, table, measured comparisons."""
    from t3d_eval import flatten_results

    arms = list(agg)
    flat = {a: flatten_results(agg[a]) for a in arms}
    shape = "x".join(map(str, cfg["shape"])) if cfg["shape"] else "native ~128x128x112"
    lines = [f"### Preset `{cfg['preset']}`", "", "```", command, "```", "",
             f"{len(cfg['seeds'])} seed(s) {cfg['seeds']}; {cfg['studies']} phantom studies "
             f"({shape} voxels); pre-training {cfg['steps']} steps x {cfg['batch_size']} studies x "
             f"{cfg['num_crops']} crops per arm; segmentation {cfg['seg_steps']} steps at "
             f"{cfg['seg_fraction']:.0%} labels; total wall clock {seconds / 60:.1f} min. "
             "Mean ± std over seeds (std 0 with one seed).", "",
             "| metric | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for key, label in SUMMARY_ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(flat[a].get(key)) for a in arms) + " |")
    tests = flat[arms[0]].get("test_studies")
    n_test = int(tests.mean) if tests is not None else 0
    lines += ["", f"{n_test} test studies (chance v2r R@1 ≈ {1 / max(n_test, 1):.2f}; chance AUC "
              "and twin accuracy 0.5).", "", "Comparisons, as measured by this run:"]
    checks = [
        _compare(flat, "t3d", "none", "linear_probe_auc/macro",
                 "T3D vs no pre-training, linear-probe AUC"),
        _compare(flat, "t3d", "none", "dice/mean",
                 f"T3D vs scratch, Dice at {cfg['seg_fraction']:.0%} labels"),
        _compare(flat, "t3d", "t3d_frozen_text", "twin_accuracy/side",
                 "T3D vs frozen text encoder, side twins"),
        _compare(flat, "t3d", "t3d_frozen_text", "twin_accuracy/present",
                 "T3D vs frozen text encoder, presence/negation twins"),
        _compare(flat, "t3d", "none", "retrieval/v2r_recall@1", "T3D vs no pre-training, v2r R@1"),
    ]
    lines += [c for c in checks if c] or ["- (the arms needed for the comparisons were not run)"]
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
    for arm in cfg["arms"]:
        for seed in cfg["seeds"]:
            if ARMS[arm] is None:
                torch.manual_seed(seed)
                ckpt, seconds = None, 0.0
                model = T3DModel.from_preset("t3d-tiny-cpu").eval()
            else:
                ckpt, seconds = pretrain(cfg, arm, seed, store, args.reuse)
                model = T3DModel.from_pretrained(ckpt).eval()
            print(f"[benchmark] downstream {arm} seed {seed}", flush=True)
            res = downstream(cfg, arm, seed, model, ckpt, store, accelerator, out)
            res["pretrain_seconds"] = seconds
            ev.write_results(res, out / "runs", f"{arm}-seed{seed}")
            per_arm.setdefault(arm, []).append(res)
    agg = {arm: ev.aggregate_seeds(runs) for arm, runs in per_arm.items()}
    json_path, md_path = ev.write_results(agg, out, "benchmark")
    seconds = time.perf_counter() - t_start
    shown = argv if argv is not None else sys.argv[1:]
    shown = [a for i, a in enumerate(shown)  # the docs command: no private output paths
             if a not in ("--results-md",) and (i == 0 or shown[i - 1] != "--results-md")]
    command = "uv run python tools/run_benchmark.py " + " ".join(shown)
    section = markdown_section(cfg, agg, command.strip(), seconds)
    (out / "summary.md").write_text(section, encoding="utf-8")
    if args.results_md != "none":
        update_results_md(Path(args.results_md), cfg["preset"], section)
    print(section)
    print(f"wrote {json_path}, {md_path}, {out / 'summary.md'}"
          + ("" if args.results_md == "none" else f" and {args.results_md}"))
    return 0


if __name__ == "__main__":
    run_cli(main)
