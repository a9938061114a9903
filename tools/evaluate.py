#!/usr/bin/env python
"""Retrieval, report-twin accuracy and zero-shot AUC of a T3D checkpoint (docs/method.md, "Evaluation").

    python tools/evaluate.py --checkpoint runs/demo/model --store STORE [--split test] [--out DIR]
    accelerate launch --config_file tools/accelerate/cpu_2proc.yaml tools/evaluate.py --config tools/configs/eval/evaluate.yaml --set store=STORE

Each volume is embedded as the mean of its crop embeddings (sliding window or random crops) by
``t3d_eval.embed_volumes``, which splits the studies over the processes and gathers them back.
Zero-shot prompts and report twins come from the store's dataset tasks (``t3d_data.tasks``;
detected, or ``--tasks NAME``): with the phantom's findings sidecar, every study also gets
``twins_per_study`` reports that differ from its own in exactly one finding attribute (side,
size, kind, presence, ...), and twin accuracy is reported overall and per attribute. Writes ``OUT/NAME.json`` and ``OUT/NAME.md``, with the
chance value of every measure (``t3d_eval.chance_retrieval``; 0.5 for twins and AUC), and ends
with a paragraph that puts each number next to its chance value.
"""

from __future__ import annotations

from t3d_train.config import run_cli
from t3d_train.eval_common import check_inputs, parse_config
from t3d_train.eval_config import EvaluateConfig
from t3d_train.evaluation import evaluate, summary

SHORTCUTS = {"checkpoint": "model.checkpoint", "store": "store", "split": "split", "out": "out",
             "name": "name", "tasks": "tasks"}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(EvaluateConfig, argv, __doc__.split("\n\n")[0], SHORTCUTS)
    check_inputs(cfg)
    results = evaluate(cfg, progress=True)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(summary(cfg, results))
    return 0


if __name__ == "__main__":
    run_cli(main)
