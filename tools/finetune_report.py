#!/usr/bin/env python
"""Fine-tune a report generator on a T3D encoder with Hugging Face Accelerate.

    python tools/finetune_report.py --config tools/configs/report/cpu-phantom.yaml \
        --checkpoint runs/demo/model --store STORE [--set section.field=value ...] [--resume latest]
    accelerate launch tools/finetune_report.py --config tools/configs/report/gpu-distilgpt2.yaml ...

The T3D vision tower (frozen, partly frozen or trainable: ``generator.encoder``) turns the
sliding-window crops of each study into visual tokens; learned queries resample them into a
visual prefix; a Hugging Face causal LM (``generator.decoder``) learns to write the report after
it. Same conventions as tools/pretrain.py: YAML + ``--set`` (unknown keys are errors),
``log.jsonl``, atomic checkpoints under ``RUN/checkpoints`` (``--resume latest``), the final
``RUN/model`` and ``RUN/summary.json``. The logic is ``t3d_train.report.finetune``.
"""

from __future__ import annotations

import sys

from t3d_train.checkpoint import resolve_resume
from t3d_train.config import run_cli
from t3d_train.eval_common import eval_parser
from t3d_train.report import ReportConfig, check_report_inputs, report_config_from_args

SHORTCUTS = {"checkpoint": "model.checkpoint", "store": "data.store", "out": "run.output_dir"}


def main(argv: list[str] | None = None) -> int:
    parser = eval_parser(__doc__.split("\n\n")[0], SHORTCUTS)
    parser.add_argument("--resume", metavar="latest|PATH",
                        help="resume from the newest complete checkpoint of the run, or a folder")
    args = parser.parse_args(argv)
    cfg = report_config_from_args(ReportConfig, args, SHORTCUTS)
    check_report_inputs(cfg)
    resume_from = (resolve_resume(args.resume, cfg.run.output_dir / "checkpoints")
                   if args.resume else None)
    from t3d_train.report import finetune

    command = ["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    summary = finetune(cfg, resume_from=resume_from, progress=True, command=command)
    print(summary["text"])
    return 0


if __name__ == "__main__":
    run_cli(main)
