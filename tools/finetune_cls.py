#!/usr/bin/env python
"""Multi-label finding classification from a T3D encoder: linear probe or full fine-tune (macro AUC).

    python tools/finetune_cls.py --checkpoint runs/demo/model --store STORE [--full] [--out DIR]
    python tools/finetune_cls.py --config tools/configs/eval/finetune_cls.yaml --set store=STORE

Linear probe (default): frozen volume features (mean over a sliding window of the pooled
bottleneck tokens, or of ``proj_v`` embeddings with ``features: embedding``), one standardised
logistic regression per finding (``t3d_eval.linear_probe``). ``--full``: encoder + linear head
trained on random crops that carry their study's labels (``t3d_eval.finetune_classifier``);
test studies are scored by the mean probability over their sliding-window crops.
AUC is torchmetrics' ``MultilabelAUROC``; single-class findings are NaN and left out of the macro.
"""

from __future__ import annotations

from t3d_train.classification import classify, summary
from t3d_train.config import run_cli
from t3d_train.eval_common import check_inputs, parse_config
from t3d_train.eval_config import ClassifyConfig

SHORTCUTS = {"checkpoint": "model.checkpoint", "store": "store", "out": "out", "name": "name",
             "full": "full=true"}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ClassifyConfig, argv, __doc__.split("\n\n")[0], SHORTCUTS)
    check_inputs(cfg)
    results = classify(cfg, progress=True)
    print(summary(cfg, results))
    return 0


if __name__ == "__main__":
    run_cli(main)
