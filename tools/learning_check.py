#!/usr/bin/env python
"""Does T3D's contrastive half learn? A tiny fixed setting, and the defaults ablated one by one.

    uv run python tools/learning_check.py                 # the library defaults (~1-2 min)
    uv run python tools/learning_check.py --compare       # every variant below, one table (~10 min)

The setting (small enough for the test suite, ``tests/test_learning.py``): 4 phantom studies of
96³ voxels, 2 *fresh* random 64³ crops of each per step (so a step never sees the same crops
twice), the ``t3d-tiny-cpu`` encoder with one Swin block per stage, TCL + alignment (the
restoration term does not collapse and is left out to halve the cost), AdamW over
:meth:`t3d_models.T3DModel.param_groups`, 30 steps. Chance values: TCL ``log(N-1) = log 7``,
alignment ``log B = log 4`` (what a constant crop embedding gives).

Reported per variant: training losses (mean of the last 10 steps), the spread of the crop
embedding, and the losses in eval mode on 4 new draws of *clean* crops of the same studies
(``eval_*``: the same input distribution for every variant, including the one trained on
corrupted crops).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STUDIES, CROPS, STEPS = 4, 2, 30
#: The objective: the ``t3d`` preset without the restoration term.
OBJECTIVE = dict(w_tir=0.0)
TINY_VISION = {"feature_size": 12, "window_size": 4, "crop_size": [64, 64, 64], "depths": [1, 1, 1, 1]}

#: The defaults before the collapse fix, then each change on its own, then all together.
VARIANTS: dict[str, dict[str, Any]] = {
    "old defaults (mlp heads, 1x lr, tau 0.07)": dict(head="mlp", vision_lr_mult=1.0, text_lr_mult=1.0,
                                                      temperature=0.07),
    "bn_mlp heads only (1x lr, tau 0.07)": dict(vision_lr_mult=1.0, text_lr_mult=1.0, temperature=0.07),
    "0.1x encoder lr only (mlp heads, tau 0.07)": dict(head="mlp", temperature=0.07),
    "bn_mlp + 0.1x lr, tau 0.07": dict(temperature=0.07),
    "bn_mlp + 0.1x lr, tau 0.2, BN momentum 0.1": dict(bn_momentum=0.1),
    "bn_mlp + 0.1x lr, tau 0.2, corrupted crops": dict(corrupted=True),
    "new defaults (bn_mlp + 0.1x lr, tau 0.2, BN momentum 0.5)": dict(),
}


def build_store(root: Path) -> Path:
    """4 small phantom studies (fixed seed) prepared into a store."""
    from t3d_data import prepare
    from t3d_data.phantom import generate_phantom_dataset

    manifest = generate_phantom_dataset(root / "raw", n_studies=STUDIES, seed=11,
                                        shape=(96, 96, 96), progress=False)
    prepare(manifest, root / "store", progress=False)
    return root / "store"


def run(store: Path, steps: int = STEPS, lr: float = 1e-3, head: str | None = None,
        vision_lr_mult: float | None = None, text_lr_mult: float | None = None,
        temperature: float | None = None, bn_momentum: float | None = None,
        corrupted: bool = False, seed: int = 0,
        threads: int | None = None) -> dict[str, Any]:
    """Train one variant; ``None`` means the library default. Returns per-step records and the
    clean-crop evaluation."""
    import inspect

    import torch
    from t3d_data import CropConfig, CropDataset, collate_crops
    from t3d_models import T3DModel
    from t3d_objectives import CropCorruption, T3DObjective, embedding_spread

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model_kw: dict[str, Any] = {} if head is None else {"head": head}
    if bn_momentum is not None:
        model_kw["head_bn_momentum"] = bn_momentum
    model = T3DModel.from_preset("t3d-tiny-cpu", restoration=False, vision=TINY_VISION, **model_kw)
    obj_kw = {} if temperature is None else {"temperature": temperature, "align_temperature": temperature}
    objective = T3DObjective.from_preset("t3d", **OBJECTIVE, **obj_kw)
    defaults = inspect.signature(model.param_groups).parameters
    groups = model.param_groups(
        lr, defaults["weight_decay"].default,
        defaults["vision_lr_mult"].default if vision_lr_mult is None else vision_lr_mult,
        defaults["text_lr_mult"].default if text_lr_mult is None else text_lr_mult, extra=objective)
    optimizer = torch.optim.AdamW(groups)
    data = CropDataset(store, CropConfig(crop_size=(64, 64, 64), num_crops=CROPS, seed=seed), split=None)
    if len(data) != STUDIES:
        raise ValueError(f"{store}: expected {STUDIES} studies, found {len(data)}")
    corrupt = CropCorruption() if corrupted else None
    gen = torch.Generator().manual_seed(seed)
    tokens = None
    params = list(model.parameters()) + list(objective.parameters())

    def batch_of(epoch: int) -> dict[str, Any]:
        data.set_epoch(epoch)
        return collate_crops([data[i] for i in range(STUDIES)])

    def forward(batch: dict[str, Any], crops: torch.Tensor) -> tuple[dict, dict]:
        out = model(crops=crops, study_index=batch["study_index"], group=batch["group"], **tokens)
        return out, objective(**out)

    records = []
    model.train()
    for step in range(steps):
        batch = batch_of(step)  # fresh crops every step
        if tokens is None:
            tokens = model.tokenize(batch["reports"])
        crops = corrupt(batch["crops"], generator=gen)[0] if corrupt else batch["crops"]
        out, losses = forward(batch, crops)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        spread = embedding_spread(out["visual_emb"], batch["study_index"])
        records.append({"step": step + 1, **{k: float(v.detach()) for k, v in losses.items()},
                        **{f"visual_{k}": v for k, v in spread.items()}})
    model.eval()
    evals = []
    with torch.no_grad():
        for epoch in range(1000, 1004):  # crops never drawn in training
            batch = batch_of(epoch)
            out, losses = forward(batch, batch["crops"])
            spread = embedding_spread(out["visual_emb"], batch["study_index"])
            evals.append({**{k: float(v) for k, v in losses.items()},
                          **{f"visual_{k}": v for k, v in spread.items()}})
    evaluation = {f"eval_{k}": sum(e[k] for e in evals) / len(evals) for k in evals[0]}
    return {"records": records, "eval": evaluation}


def chance() -> dict[str, float]:
    """Losses of a constant embedding per term (``t3d_objectives.chance_losses``): TCL
    log(N-1), alignment log(B)."""
    import dataclasses

    from t3d_objectives import PRESETS, chance_losses

    terms = chance_losses(dataclasses.replace(PRESETS["t3d"], **OBJECTIVE), studies=STUDIES,
                          crops_per_study=CROPS)
    return {key: value for key, (_, value) in terms.items()}


def summary(result: dict[str, Any], last: int = 10) -> dict[str, float]:
    """Means of the last ``last`` training steps, plus the clean-crop evaluation."""
    tail = result["records"][-last:]
    out = {k: sum(r[k] for r in tail) / len(tail) for k in tail[0] if k != "step"}
    return {**out, **result["eval"]}


def table(rows: dict[str, dict[str, float]], seconds: dict[str, float]) -> str:
    """Markdown table of :func:`summary` per variant, losses next to chance."""
    c = chance()
    lines = [f"| variant | TCL (chance {c['tcl_loss']:.3f}) | align (chance {c['align_loss']:.3f}) | "
             "eval TCL | eval align | same-study cos | cross-study cos | std·√E | s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in rows.items():
        lines.append(f"| {name} | {s['tcl_loss']:.3f} | {s['align_loss']:.3f} | {s['eval_tcl_loss']:.3f} | "
                     f"{s['eval_align_loss']:.3f} | {s['visual_same_cos']:.3f} | "
                     f"{s['visual_cross_cos']:.3f} | {s['visual_std_ratio']:.3f} | {seconds[name]:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", action="store_true", help="run every variant and print one table")
    p.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--log", type=Path, help="append every step of every variant, then its summary, "
                   "to this JSONL file")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    variants = VARIANTS if args.compare else {"new defaults": {}}
    rows, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(Path(tmp))
        for name, kw in variants.items():
            t0 = time.perf_counter()
            result = run(store, steps=args.steps, threads=args.threads, **kw)
            seconds[name] = time.perf_counter() - t0
            rows[name] = summary(result)
            print(f"{name}: {json.dumps({k: round(v, 4) for k, v in rows[name].items()})}",
                  file=sys.stderr, flush=True)
            if args.log:
                with args.log.open("a", encoding="utf-8") as fh:
                    for r in result["records"]:
                        fh.write(json.dumps({"variant": name, **r}) + "\n")
                    fh.write(json.dumps({"variant": name, "summary": rows[name]}) + "\n")
    print(table(rows, seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
