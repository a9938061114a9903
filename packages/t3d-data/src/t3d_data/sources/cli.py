"""``t3d-data import <dataset> ROOT -o manifest.jsonl`` (registered by :mod:`t3d_data.cli`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_import_parser", "run_import"]

_SHOW_BAD = 20  # bad rows printed one per line; the rest are counted


def add_import_parser(sub: argparse._SubParsersAction) -> None:
    """Adds the ``import`` subcommand to the ``t3d-data`` parser."""
    from t3d_data.sources import DATASETS

    p = sub.add_parser("import", help="turn a public dataset's files into a manifest (no "
                       "volume is copied)", description="Datasets: " + "; ".join(
                           f"{k}: {v[2]}" for k, v in DATASETS.items())
                       + ". Layouts and commands: docs/datasets.md.")
    p.add_argument("dataset", choices=list(DATASETS))
    p.add_argument("root", type=Path, help="the dataset's download folder")
    p.add_argument("-o", "--out", type=Path, required=True, help="manifest to write (.jsonl); "
                   "prompts/classes files are written next to it")
    p.add_argument("--seed", type=int, help="seed of the patient-level splits drawn where the "
                   "dataset has none (default 0)")
    p.add_argument("--val-fraction", type=float, help="ct-rate: fraction of official-train "
                   "patients that become val (default 0.1); msd/brats: val fraction "
                   "(default 0.2)")
    p.add_argument("--language", choices=("es", "en"), help="bimcv-r: report language "
                   "(default es, the original; en: the translations)")
    p.add_argument("--split-file", type=Path, help="btcv: the split json (default "
                   "ROOT/dataset_0.json, else the built-in copy of MONAI's)")
    p.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="fail (exit 2, manifest still written) when more than this fraction of "
                   "the rows is bad (default 0.05)")


def run_import(args: argparse.Namespace) -> None:
    """Runs the subcommand; prints the bad rows (stderr) and a summary.

    Raises:
        ValueError: more than ``--max-bad-fraction`` of the rows is bad (after writing).
    """
    from t3d_data.sources import import_dataset, write_import

    if not 0 <= args.max_bad_fraction <= 1:
        raise ValueError(f"--max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}")
    result = import_dataset(args.dataset, args.root, seed=args.seed,
                            val_fraction=args.val_fraction, language=args.language,
                            split_file=args.split_file)
    for bad in result.bad[:_SHOW_BAD]:
        print(f"t3d-data: bad row: {bad}", file=sys.stderr)
    if len(result.bad) > _SHOW_BAD:
        print(f"t3d-data: ... and {len(result.bad) - _SHOW_BAD} more bad rows", file=sys.stderr)
    if result.missing:
        print(f"t3d-data: {len(result.missing)} rows have no volume on disk (not downloaded?), "
              f"e.g. {result.missing[0].file}", file=sys.stderr)
    written = write_import(result, args.out)
    for note in result.notes:
        print(note)
    print(result.summary())
    print("wrote " + ", ".join(map(str, written)))
    total = len(result.rows) + len(result.bad)
    if total and len(result.bad) / total > args.max_bad_fraction:
        raise ValueError(f"{len(result.bad)} of {total} rows are bad (more than "
                         f"--max-bad-fraction {args.max_bad_fraction}); see the lines above")
