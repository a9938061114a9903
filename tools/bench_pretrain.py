#!/usr/bin/env python
"""Pre-training throughput benchmark: steps/s, sub-volumes/s, data-wait fraction, peak memory.

Runs ``tools/pretrain.py`` as a user would (a subprocess per setting) on the phantom demo store
and reads each run's ``summary.json``. The baseline, measured in the same run, is the same
training with synchronous loading (``data.num_workers=0``); the default loader settings must
keep the data wait under 10% of the step time.

    uv run python tools/bench_pretrain.py                       # tiny preset, this CPU
    uv run python tools/bench_pretrain.py --config tools/configs/pretrain/t3d-base.yaml \
        --steps 30 --set data.store=/data/t3d/store               # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_setting(name: str, extra: list[str], args: argparse.Namespace, out: Path) -> dict:
    run_dir = out / "".join(c if c.isalnum() else "-" for c in name)
    cmd = [sys.executable, str(ROOT / "tools" / "pretrain.py")]
    if args.config:
        cmd += ["--config", str(args.config)]
    cmd += ["--set", f"optim.max_steps={args.steps}", "--set", f"run.output_dir={run_dir}",
            "--set", "run.eval_split=null", "--set", f"run.checkpoint_every={10**9}",
            "--set", "run.tensorboard=false", *[x for s in args.set for x in ("--set", s)], *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace")
    if res.returncode != 0:
        raise SystemExit(f"{name}: pretrain.py failed:\n{res.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    # The first step pays one-off costs (allocator, first worker start): report it apart.
    log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    return {"setting": name, "steps": summary["steps"],
            "steps_per_s": summary["steps_per_second"], "crops_per_s": summary["crops_per_second"],
            "data_wait_pct": 100 * summary["data_wait_fraction"],
            "peak_mib": summary["peak_memory_mib"], "first_step_s": log[0]["time"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="pretrain YAML (default: the embedded CPU demo)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per setting")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers of the default setting (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="A.B=V",
                   help="extra pretrain.py override for every setting")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="t3d-bench-") as tmp:
        out = Path(tmp)
        default = [] if args.workers is None else ["--set", f"data.num_workers={args.workers}"]
        rows = [run_setting("baseline: num_workers=0", ["--set", "data.num_workers=0"], args, out),
                run_setting("default loader", default, args, out)]
    head = ["setting", "steps", "steps_per_s", "crops_per_s", "data_wait_pct", "peak_mib",
            "first_step_s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(f"{r[h]:.3f}" if isinstance(r[h], float) else str(r[h])
                                for h in head) + " |")
    ratio = rows[1]["crops_per_s"] / max(rows[0]["crops_per_s"], 1e-9)
    print(f"default / baseline throughput: {ratio:.2f}x; data wait with default loader: "
          f"{rows[1]['data_wait_pct']:.1f}% (target < 10%)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
