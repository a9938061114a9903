#!/usr/bin/env python
"""Report generation evidence: the generator on a T3D encoder vs three baselines, one table.

    python tools/report_evidence.py --config tools/configs/report/cpu-evidence.yaml \
        --checkpoint PRETRAINED/model --store STORE [--update-docs]

Arms: the generator on the pre-trained (frozen) encoder; (a) the most frequent training report;
(b) the nearest training report by T3D volume→report retrieval; (c) the generator on a randomly
initialised encoder; with ``--ablations``, the generator without location standardisation and
without the finding loss. Clinical macro F1 with paired bootstrap 95% intervals, BLEU-1..4, ROUGE-L.
Writes ``RUN/report_evidence.{json,md}`` and one JSONL per system; ``--update-docs`` also
rewrites the "Report generation" section of docs/results.md. Logic: ``t3d_train.report``.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from t3d_train.config import run_cli
from t3d_train.eval_common import eval_parser
from t3d_train.report import ReportConfig, check_report_inputs, report_config_from_args

SHORTCUTS = {"checkpoint": "model.checkpoint", "store": "data.store", "out": "run.output_dir"}
DOCS = "docs/results.md"


def main(argv: list[str] | None = None) -> int:
    parser = eval_parser(__doc__.split("\n\n")[0], SHORTCUTS)
    parser.add_argument("--update-docs", action="store_true",
                        help="rewrite the 'Report generation' section of --results-md")
    parser.add_argument("--results-md", type=Path, default=Path(DOCS),
                        help=f"the results file --update-docs writes (default {DOCS})")
    parser.add_argument("--budget-minutes", type=int, default=30, help="stated in the table")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--ablations", action="store_true",
                        help="also fine-tune the generator on the T3D tokens without location "
                             "standardisation and without the finding loss (two more arms)")
    parser.add_argument("--render", metavar="RUN", type=Path,
                        help="only re-render RUN/report_evidence.json (no training) into "
                             "RUN/report_evidence.md and, with --update-docs, --results-md")
    args = parser.parse_args(argv)
    if args.render is not None:
        import json

        from t3d_train.files import write_text_atomic
        from t3d_train.report import evidence_markdown, update_docs_section

        section = evidence_markdown(json.loads((args.render / "report_evidence.json").read_text(
            encoding="utf-8")))
        write_text_atomic(args.render / "report_evidence.md", section + "\n")
        if args.update_docs:
            update_docs_section(args.results_md, section)
        print(f"rendered {args.render}/report_evidence.md")
        return 0
    cfg = report_config_from_args(ReportConfig, args, SHORTCUTS)
    check_report_inputs(cfg)
    if args.update_docs and not args.results_md.parent.is_dir():
        from t3d_train.config import ConfigError

        raise ConfigError(f"--results-md: folder {args.results_md.parent} does not exist")
    from t3d_train.report import report_evidence

    command = shlex.join(["python", "tools/report_evidence.py",
                          *(sys.argv[1:] if argv is None else argv)])
    machine = f"{os.cpu_count()} CPU cores (shared with other jobs; times are not benchmarks)"
    result = report_evidence(cfg, budget_minutes=args.budget_minutes, n_resamples=args.resamples,
                             docs=args.results_md if args.update_docs else None, command=command,
                             machine=machine, progress=True, ablations=args.ablations)
    for line in result["verdicts"]:
        print(line)
    print(f"wrote {cfg.run.output_dir}/report_evidence.json and .md"
          + (f"; updated {args.results_md}" if args.update_docs else ""))
    return 0


if __name__ == "__main__":
    run_cli(main)
