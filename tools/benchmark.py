#!/usr/bin/env python
"""Run a frozen, versioned benchmark suite on a checkpoint and a store (docs/evaluation.md).

    python tools/benchmark.py --list
    python tools/benchmark.py SUITE --checkpoint RUN/model --store STORE [--out DIR] [--update-docs]

A suite is a data file shipped with t3d_train (``t3d_train/suites/SUITE.yaml``; a path to a
YAML also works): dataset, splits, labels or classes, prompt set, threshold rule, label
fractions, budget, metrics and bootstrap. The checkpoint and a random-init baseline of its
architecture (``--no-baseline`` to skip) are scored through the evaluation scripts' functions;
every metric gets a 95% interval from a patient-level bootstrap. Writes ``OUT/SUITE.json`` and
``OUT/SUITE.md`` (suite version, checkpoint sha256, preprocessing record, store, command);
``--update-docs`` also writes the suite's table into docs/results.md. A store without what the
suite needs (split, labels, masks) is refused with one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from t3d_train.config import ConfigError, run_cli

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("suite", nargs="?", help="suite name (see --list) or path to a suite YAML")
    p.add_argument("--list", action="store_true", help="list the shipped suites and exit")
    p.add_argument("--checkpoint", type=Path, help="a save_pretrained folder (RUN/model)")
    p.add_argument("--store", type=Path, help="a prepared store (holds index.json)")
    p.add_argument("--out", type=Path, default=Path("runs/benchmarks"),
                   help="results folder (default runs/benchmarks)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the random-init baseline arm")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a budget key (finetune.*, label_fractions, embedding.*, "
                        "bootstrap.resamples); the output then says it is not the frozen suite")
    p.add_argument("--update-docs", action="store_true",
                   help="also write the suite's table into docs/results.md")
    p.add_argument("--results-md", type=Path, default=ROOT / "docs" / "results.md",
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from t3d_train.suite import describe_suites, docs_block, load_suite, plain_command, run_suite
    from t3d_train.suite import update_docs as write_docs

    if args.list:
        print("\n".join(describe_suites()))
        return 0
    if args.suite is None or args.checkpoint is None or args.store is None:
        raise ConfigError("give a suite, --checkpoint RUN/model and --store STORE "
                          "(or --list to see the suites)")
    suite, provenance = load_suite(args.suite, args.overrides)
    if args.update_docs and provenance["overrides"]:
        raise ConfigError("--update-docs writes only the frozen suite's numbers; drop --set")
    shown = [a for a in argv if a != "--results-md"]
    if "--results-md" in argv:  # a test's scratch copy of docs/results.md is not the command
        i = argv.index("--results-md")
        shown = argv[:i] + argv[i + 2:]
    results = run_suite(suite, provenance, args.checkpoint, args.store, args.out,
                        baseline=not args.no_baseline, command=plain_command(shown),
                        threads=args.threads, progress=True)
    name = results["suite"]["name"]
    print(f"wrote {args.out / (name + '.json')} and {args.out / (name + '.md')}")
    if args.update_docs:
        write_docs(args.results_md, suite, docs_block(suite, results))
        print(f"updated the {name} table in {args.results_md}")
    print((args.out / f"{name}.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    run_cli(main)
