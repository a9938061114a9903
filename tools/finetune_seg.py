#!/usr/bin/env python
"""Segmentation fine-tuning: MONAI SwinUNETR initialised from a T3D checkpoint, or from scratch.

    python tools/finetune_seg.py --checkpoint runs/demo/model --store STORE [--fraction 0.1]
    python tools/finetune_seg.py --checkpoint runs/demo/model --store STORE --scratch
    python tools/finetune_seg.py --config tools/configs/eval/finetune_seg.yaml --set store=STORE
    python tools/finetune_seg.py --dataset brats --checkpoint runs/demo/model --store BRATS_STORE

``t3d_models.build_monai_swinunetr`` loads the T3D encoder (and the TIR-trained decoder) into a
plain ``SwinUNETR``; ``--scratch`` builds the same architecture (``swinunetr_kwargs``) with
MONAI's initialisation. Both get the same budget (``steps`` of ``t3d_eval.finetune_segmentation``
on ``label_fraction`` of the labelled training studies). Test volumes are predicted with
``sliding_window_inference`` on their own voxel grid and scored with MONAI ``DiceMetric`` per
class; a few predictions are saved as overlay PNGs (``OUT/overlays/NAME_STUDY.png``, the study
id made a safe file name by ``t3d_data.names.safe_filename``). Label values are merged into the
classes of ``classes`` (default ``null``: the store's dataset tasks, ``t3d_data.tasks``; the
phantom's are lungs, heart, liver, spleen, kidneys; ``--tasks NAME`` names the provider). Results go to ``OUT/NAME.json`` (default NAME: ``seg-t3d`` or ``seg-scratch``);
the closing summary compares with the other arm's results in OUT when it had the same budget.

``--dataset brats`` (a store of ``t3d-data import brats``): 4 MRI channels, so the 1-channel
checkpoint's input kernels are adapted (``--set channel_adapt=repeat|average``), volumes are
z-scored per channel on the foreground (the results' preprocessing record says
``zscore_foreground``), classes NCR/ED/ET (labels 1/2/3, 2021's ET 4), tested on split ``val``.
A CT-windowed checkpoint is refused on MR data unless the fine-tune sets that policy.
"""

from __future__ import annotations

import sys

from t3d_train.config import run_cli
from t3d_train.eval_common import check_inputs, parse_config
from t3d_train.eval_config import SegmentationConfig
from t3d_train.segmentation import baseline_results, other_arm_command, segment, summary

SHORTCUTS = {"checkpoint": "model.checkpoint", "store": "store", "out": "out", "name": "name",
             "tasks": "tasks", "dataset": "dataset", "fraction": "label_fraction", "steps": "steps", "scratch": "scratch=true"}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(SegmentationConfig, argv, __doc__.split("\n\n")[0], SHORTCUTS)
    check_inputs(cfg)
    results = segment(cfg, progress=True)
    command = other_arm_command(cfg, sys.argv[1:] if argv is None else argv)
    print(summary(cfg, results, baseline_results(cfg, results), command))
    return 0


if __name__ == "__main__":
    run_cli(main)
