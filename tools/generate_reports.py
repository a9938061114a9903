#!/usr/bin/env python
"""Generate a report per study with a fine-tuned generator; write JSONL and score it.

    python tools/generate_reports.py --checkpoint runs/report/model --store STORE \
        [--split test] [--out runs/report/generated.jsonl] [--set generate.num_beams=3 ...]
    python tools/generate_reports.py --score runs/report/generated.jsonl   # score a JSONL only

Each JSONL line is ``{"study_id", "generated", "reference"}``. Scores: BLEU-1..4 and ROUGE-L
(torchmetrics) and clinical efficacy (per-finding precision / recall / F1 and macro F1 with a
bootstrap 95% interval, by the rule-based labeller ``labeller: phantom | ct-rate``); written
next to the JSONL as ``NAME.scores.json``. The logic is ``t3d_train.report``.
"""

from __future__ import annotations

from pathlib import Path

from t3d_train.config import run_cli
from t3d_train.eval_common import eval_parser
from t3d_train.report import GenerateConfig, check_generate_inputs, report_config_from_args

SHORTCUTS = {"checkpoint": "checkpoint", "store": "store", "split": "split", "out": "out"}


def main(argv: list[str] | None = None) -> int:
    parser = eval_parser(__doc__.split("\n\n")[0], SHORTCUTS)
    parser.add_argument("--score", metavar="JSONL", type=Path,
                        help="only score an existing JSONL (no model, no store)")
    parser.add_argument("--labeller", default=None, help="phantom (default) or ct-rate")
    args = parser.parse_args(argv)
    from t3d_train.files import write_json_atomic
    from t3d_train.report import read_jsonl, score_line, score_rows

    if args.score is not None:
        from t3d_train.config import ConfigError

        if not args.score.is_file():
            raise ConfigError(f"--score: {args.score} does not exist; pass a JSONL written by "
                              "tools/generate_reports.py")
        rows = read_jsonl(args.score)
        scores = score_rows(rows, args.labeller or "phantom")
        out = args.score
    else:
        if args.labeller is not None:
            args.overrides.append(f"labeller={args.labeller}")
        cfg = report_config_from_args(GenerateConfig, args, SHORTCUTS)
        check_generate_inputs(cfg)
        from t3d_train.report import generate_reports

        result = generate_reports(cfg, progress=True)
        scores, out = result["scores"], Path(result["out"])
        print(f"wrote {out} ({len(result['rows'])} studies, {result['seconds']:.0f} s)")
        if scores is None:
            return 0
    path = out.with_suffix(".scores.json")
    write_json_atomic(path, scores)
    print(score_line(out.stem, scores) + f"; scores in {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
