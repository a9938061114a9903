#!/usr/bin/env python
"""GPU check: one table of the speed knobs of a T3D pre-training step, and a JSON file.

Run through ``tools/gpu_check.sh`` (about 8 minutes on one H200). Measures, for ``t3d-base``
(feature size 48, 96^3 crops, bf16 autocast, fused AdamW; the bundled MiniLM stands in for
RadBERT offline):

1. the full step (model, ``T3DObjective``, backward, clipping, AdamW) for eager vs SDPA window
   attention (``model.vision.attention``) vs ``torch.compile`` (``run.compile``), gradient
   checkpointing off/on (``run.gradient_checkpointing``), at 8, 16 and 32 crops: crops/s, step
   time, peak memory and the first step's loss against the eager one (same weights and batch);
2. the largest batch that fits 80 GB and 141 GB, from a linear fit of peak memory against
   crops (and one confirming step at the largest batch that fits this device);
3. the pre-training loop (``tools/pretrain.py`` on a phantom store) with 0, 4 and 8 loader
   workers (``data.num_workers``): crops/s and data-wait fraction.

``--smoke`` runs the same code on the CPU at the tiny preset in well under a minute of compute
(the test suite runs it); its numbers mean nothing.

    tools/gpu_check.sh --out gpu_check.json
    uv run python tools/gpu_check.py --smoke --out /tmp/gpu_check_smoke.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
GIB = {"80 GB": 80e9 / 2**30, "141 GB": 141e9 / 2**30}

#: (crops, variant) measured by the full check; the first variant of each batch is its baseline.
FULL_MATRIX = [
    (16, "eager"), (16, "sdpa"), (16, "sdpa,compile"), (16, "sdpa,checkpoint"),
    (8, "sdpa"), (8, "sdpa,checkpoint"), (32, "sdpa"), (32, "sdpa,checkpoint"),
]
SMOKE_MATRIX = [(4, "eager"), (4, "sdpa,checkpoint")]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny preset on the CPU (a test of the script)")
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON results")
    p.add_argument("--preset", default=None, help="model preset (default t3d-base; smoke: t3d-tiny-cpu)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed steps per setting after the first (default 5; smoke 0: the first)")
    p.add_argument("--loop-steps", type=int, default=None,
                   help="pre-training steps per loader setting (default 20; smoke 1)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="loader workers to compare (default 0 4 8; smoke 0)")
    p.add_argument("--skip-loop", action="store_true", help="only the model step (parts 1-2)")
    return p.parse_args(argv)


def _model_config(preset: str) -> Any:
    from t3d_models import T3DModelConfig

    cfg = T3DModelConfig.from_preset(preset)
    text = cfg.text.model_copy(update={"model_name_or_path": "minilm"})  # offline stand-in
    return cfg.model_copy(update={"text": text})


def _oom(err: BaseException) -> bool:
    return "out of memory" in str(err).lower()


def step_matrix(matrix: list[tuple[int, str]], args: argparse.Namespace, device: Any) -> list[dict]:
    """Part 1: every (crops, variant) setting; an out-of-memory setting is recorded as such."""
    import torch
    from t3d_train.speed import (
        build_full_step,
        parse_variant,
        peak_memory,
        reset_peak_memory,
        timed_step,
    )

    config = _model_config(args.preset)
    bf16 = device.type == "cuda"
    rows, state, eager_loss = [], None, {}
    for crops, variant in matrix:
        knobs = {"fused": True, **parse_variant(variant)}
        row: dict[str, Any] = {"crops": crops, "variant": variant, "bf16": bf16}
        t0 = time.perf_counter()
        entry = None
        try:
            entry = build_full_step(config, knobs, state, device, crops=crops,
                                    crops_per_study=4 if crops % 4 == 0 else 2, bf16=bf16)
            if state is None:
                state = {k: v.detach().clone() for k, v in entry["model"].state_dict().items()}
            reset_peak_memory(device)
            first_s, _, first_loss = timed_step(entry, device)
            times = [timed_step(entry, device)[0] for _ in range(args.repeats)] or [first_s]
            step_s = statistics.median(times)
            eager_loss.setdefault(crops, first_loss)
            row.update(step_s=step_s, crops_per_s=crops / step_s, first_step_s=first_s,
                       setup_s=time.perf_counter() - t0, peak_gib=peak_memory(device),
                       loss=first_loss, loss_diff=abs(first_loss - eager_loss[crops]))
        except torch.OutOfMemoryError as err:
            row["error"] = f"OOM: {str(err).splitlines()[0][:120]}"
        except RuntimeError as err:
            if not _oom(err):
                raise
            row["error"] = "OOM"
        finally:
            del entry
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(f"[gpu_check] {crops} crops {variant}: "
              + (f"{row['crops_per_s']:.1f} crops/s" if "error" not in row else row["error"]),
              file=sys.stderr, flush=True)
    return rows


def largest_batch(rows: list[dict], device_gib: float | None) -> list[dict]:
    """Part 2: per variant, fit peak GiB = a + b * crops over the measured batches; the largest
    batch (a multiple of 4 crops) under each memory size."""
    out = []
    for variant in sorted({r["variant"] for r in rows}):
        pts = [(r["crops"], r["peak_gib"]) for r in rows
               if r["variant"] == variant and r.get("peak_gib") is not None]
        if len({c for c, _ in pts}) < 2:
            continue
        xs, ys = zip(*pts, strict=True)
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x in xs)
        a = my - b * mx
        row = {"variant": variant, "gib_per_crop": b, "fixed_gib": a}
        sizes = dict(GIB)
        if device_gib:
            sizes["this device"] = device_gib
        for name, gib in sizes.items():
            row[name] = int((gib * 0.95 - a) / b) // 4 * 4 if b > 0 else None  # 5 % headroom
        out.append(row)
    return out


def confirm_batch(fit: list[dict], args: argparse.Namespace, device: Any) -> dict | None:
    """One step at the predicted largest batch for this device (fastest variant with a fit)."""
    import torch
    from t3d_train.speed import (
        build_full_step,
        parse_variant,
        peak_memory,
        reset_peak_memory,
        timed_step,
    )

    if device.type != "cuda" or not fit:
        return None
    best = next((f for f in fit if f["variant"] == "sdpa,checkpoint"), fit[0])
    crops = best.get("this device")
    if not crops:
        return None
    res = {"variant": best["variant"], "crops": crops}
    try:
        entry = build_full_step(_model_config(args.preset), {"fused": True, **parse_variant(best["variant"])},
                                None, device, crops=crops, crops_per_study=4, bf16=True)
        reset_peak_memory(device)
        res["step_s"] = timed_step(entry, device)[0]
        res["peak_gib"] = peak_memory(device)
        res["fits"] = True
        del entry
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _oom(err) and not isinstance(err, torch.OutOfMemoryError):
            raise
        res["fits"] = False
    torch.cuda.empty_cache()
    return res


def loader_check(args: argparse.Namespace, workdir: Path) -> list[dict]:
    """Part 3: tools/pretrain.py on a phantom store, one run per worker count."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    shape = ["64", "64", "64"] if args.smoke else ["160", "160", "128"]
    studies = "10" if args.smoke else "32"
    store = workdir / "data" / "store"
    subprocess.run([sys.executable, "-m", "t3d_data.cli", "demo", str(workdir / "data"),
                    "--studies", studies, "--shape", *shape], check=True, env=env,
                   capture_output=True)
    config = ["--config", str(ROOT / "tools/configs/pretrain/cpu-demo.yaml"),
              "--set", "data.batch_size=2"] if args.smoke else [
        "--config", str(ROOT / "tools/configs/pretrain/t3d-base.yaml"),
        "--set", "model.text.model_name_or_path=minilm", "--set", "model.text.max_length=128"]
    rows = []
    for workers in args.workers:
        run_dir = workdir / f"run-w{workers}"
        cmd = [sys.executable, str(ROOT / "tools" / "pretrain.py"), *config,
               "--set", f"data.store={store}",
               "--set", f"data.num_workers={workers}", "--set", f"optim.max_steps={args.loop_steps}",
               "--set", f"run.output_dir={run_dir}", "--set", "run.eval_split=null",
               "--set", f"run.checkpoint_every={10**9}", "--set", "run.tensorboard=false"]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                             encoding="utf-8", errors="replace")
        if res.returncode != 0:
            rows.append({"workers": workers, "error": res.stderr.strip().splitlines()[-1][:200]})
            continue
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        rows.append({"workers": workers, "steps": summary["steps"],
                     "crops_per_s": summary["crops_per_second"],
                     "data_wait_pct": 100 * summary["data_wait_fraction"],
                     "peak_mib": summary["peak_memory_mib"], "wall_s": time.perf_counter() - t0})
        print(f"[gpu_check] loader {workers} workers: {rows[-1]['crops_per_s']:.1f} crops/s, "
              f"wait {rows[-1]['data_wait_pct']:.1f} %", file=sys.stderr, flush=True)
    return rows


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, float) else str(v)


def table(result: dict) -> str:
    """The one printed table (three parts under one heading)."""
    m = result["meta"]
    lines = [f"# T3D GPU check, {m['date']}, {m['device_name']}, torch {m['torch']}, "
             f"preset {m['preset']}{' (SMOKE: numbers mean nothing)' if m['smoke'] else ''}", "",
             "| part | setting | crops | crops/s | step s | peak GiB | loss diff vs eager | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["steps"]:
        note = r.get("error", f"first step {r['first_step_s']:.1f} s")
        lines.append(f"| step | {r['variant']} | {r['crops']} | {_fmt(r.get('crops_per_s'), '.1f')} "
                     f"| {_fmt(r.get('step_s'), '.3f')} | {_fmt(r.get('peak_gib'))} "
                     f"| {_fmt(r.get('loss_diff'), '.2e')} | {note} |")
    for f in result["largest_batch"]:
        sizes = ", ".join(f"{k}: {f[k]}" for k in ("80 GB", "141 GB", "this device") if k in f)
        lines.append(f"| largest batch | {f['variant']} | {sizes} | | | "
                     f"{f['fixed_gib']:.1f} + {f['gib_per_crop']:.2f}/crop | | linear fit |")
    c = result.get("confirm")
    if c:
        lines.append(f"| largest batch | {c['variant']} (one step) | {c['crops']} | | "
                     f"{_fmt(c.get('step_s'), '.3f')} | {_fmt(c.get('peak_gib'))} | | "
                     f"{'fits' if c['fits'] else 'OOM'} |")
    for r in result["loader"]:
        note = r.get("error", f"data wait {_fmt(r.get('data_wait_pct'), '.1f')} %")
        lines.append(f"| loop | {r['workers']} workers | | {_fmt(r.get('crops_per_s'), '.1f')} | | "
                     f"{_fmt(r['peak_mib'] / 1024 if 'peak_mib' in r else None)} | | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    if args.smoke:
        device = torch.device("cpu")
        args.preset = args.preset or "t3d-tiny-cpu"
        args.repeats = 0 if args.repeats is None else args.repeats  # the first step is timed
        args.loop_steps = args.loop_steps or 1
        args.workers = args.workers or [0]
        matrix = SMOKE_MATRIX
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device; run with --smoke to test the script on the CPU",
                  file=sys.stderr)
            return 2
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        args.preset = args.preset or "t3d-base"
        args.repeats = args.repeats or 5
        args.loop_steps = args.loop_steps or 20
        args.workers = args.workers if args.workers is not None else [0, 4, 8]
        matrix = FULL_MATRIX
    t0 = time.perf_counter()
    device_gib = (torch.cuda.get_device_properties(device).total_memory / 2**30
                  if device.type == "cuda" else None)
    steps = step_matrix(matrix, args, device)
    fit = largest_batch(steps, device_gib)
    result: dict[str, Any] = {
        "meta": {"date": time.strftime("%Y-%m-%d"), "smoke": args.smoke, "preset": args.preset,
                 "torch": torch.__version__, "device": device.type,
                 "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                 else "cpu", "device_gib": device_gib, "repeats": args.repeats,
                 "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)])},
        "steps": steps, "largest_batch": fit, "confirm": confirm_batch(fit, args, device),
        "loader": []}
    if not args.skip_loop:
        with tempfile.TemporaryDirectory(prefix="t3d-gpu-check-") as tmp:
            result["loader"] = loader_check(args, Path(tmp))
    result["meta"]["seconds"] = time.perf_counter() - t0
    text = table(result)
    result["table"] = text
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2, default=lambda o: None
                                  if isinstance(o, float) and math.isnan(o) else str(o)),
                       encoding="utf-8")
    tmp_out.replace(args.out)  # atomic
    print(f"wrote {args.out} ({result['meta']['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
