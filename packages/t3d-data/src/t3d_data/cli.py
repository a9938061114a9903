"""Command line: ``t3d-data prepare | index | import | validate | phantom | demo``.

Heavy modules (torch, zarr, SimpleITK) are imported inside the commands, so ``--help`` is fast.
Bad input prints one line per problem to stderr, each naming the file/field (or the option, as
spelled on the command line) and the fix, and exits with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

EXIT_BAD_INPUT = 2
_MIN_PHANTOM_EDGE = 24  # t3d_data.phantom's smallest volume edge


def _add_prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk", type=int, default=64, help="chunk edge in voxels (default 64)")
    p.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="fail when more than this fraction of studies is bad, after trying them "
                   "all (default 0.05)")
    p.add_argument("--max-voxels", type=int, default=2**31,
                   help="refuse volumes whose header declares more voxels (default 2**31)")
    p.add_argument("--max-bytes", type=int, default=2**32,
                   help="refuse volumes whose header declares more decoded voxel bytes, voxels x "
                   "datatype size (default 2**32 = 4 GiB)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that read and write studies, one study each at a time (memory "
                   "per worker: about the largest volume); the store is the same for any number "
                   "(default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="t3d-data", description="T3D data: validate manifests, prepare chunked CT stores, "
        "generate phantom CT-report data.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="prepare a manifest into a chunked zarr store")
    p.add_argument("manifest", type=Path, help="JSONL or CSV manifest")
    p.add_argument("out", type=Path, help="store folder: new, empty, or a store prepare created "
                   "(reruns resume)")
    _add_prepare_args(p)
    p.add_argument("--shard", metavar="I/N",
                   help="prepare only shard I of N of the manifest (studies assigned by a hash of "
                   "study_id) into OUT/index.shard-I-of-N.json; run all N (at once, on any "
                   "machines sharing OUT), then `t3d-data index OUT`")
    p = sub.add_parser("index", help="merge and check the shard indexes of a sharded prepare "
                       "into STORE/index.json")
    p.add_argument("store", type=Path, help="the store the shards prepared into")
    p.add_argument("--manifest", type=Path, help="the manifest the shards read (default: the "
                   "path they recorded; checked against its recorded sha256)")
    p.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="fail when more than this fraction of the manifest is quarantined "
                   "(default 0.05)")
    from t3d_data.sources.cli import add_import_parser

    add_import_parser(sub)  # t3d-data import <dataset> ROOT -o manifest.jsonl
    p = sub.add_parser("validate", help="check a manifest and list all its errors")
    p.add_argument("manifest", type=Path)
    for name, text in (("phantom", "write a synthetic CT-report dataset (NIfTI + manifest)"),
                       ("demo", "phantom dataset into OUT/phantom, prepared into OUT/store")):
        p = sub.add_parser(name, help=text)
        p.add_argument("out", type=Path)
        p.add_argument("--studies", type=int, default=24)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                       help="one volume size for every study (default: ~128x128x112, varying)")
    _add_prepare_args(p)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Checks option values up front, naming them as the user typed them."""
    checks = [
        ("chunk", "--chunk", lambda v: v >= 1, "must be >= 1"),
        ("max_bad_fraction", "--max-bad-fraction", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
        ("max_voxels", "--max-voxels", lambda v: v >= 1, "must be >= 1"),
        ("max_bytes", "--max-bytes", lambda v: v >= 1, "must be >= 1"),
        ("studies", "--studies", lambda v: v >= 1, "must be >= 1"),
        ("workers", "--workers", lambda v: v >= 1, "must be >= 1"),
        ("shape", "--shape", lambda v: v is None or min(v) >= _MIN_PHANTOM_EDGE,
         f"must be 3 sizes >= {_MIN_PHANTOM_EDGE} voxels (X Y Z)"),
    ]
    for attr, flag, ok, rule in checks:
        value = getattr(args, attr, None)
        if attr in vars(args) and not ok(value):
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            raise ValueError(f"{flag} {rule}, got {shown}")
    if getattr(args, "shard", None) is not None:
        from t3d_data.shards import Shard

        Shard.parse(args.shard)  # ValueError names --shard


def _prepare(manifest: Path, out: Path, args: argparse.Namespace) -> None:
    from t3d_data.store import prepare

    shard = getattr(args, "shard", None)
    summary = prepare(manifest, out, chunk=args.chunk, max_bad_fraction=args.max_bad_fraction,
                      max_voxels=args.max_voxels, max_bytes=args.max_bytes,
                      progress=not args.no_progress, workers=args.workers, shard=shard)
    print(summary)
    if shard is not None:
        print(f"shard {shard} done; when all shards are, run: t3d-data index {out}")


def _phantom(out: Path, args: argparse.Namespace) -> Path:
    from t3d_data.phantom import generate_phantom_dataset

    shape = tuple(args.shape) if args.shape else None
    manifest = generate_phantom_dataset(out, n_studies=args.studies, seed=args.seed, shape=shape,
                                        progress=not getattr(args, "no_progress", False))
    print(f"phantom dataset: {args.studies} studies, manifest {manifest}")
    return Path(manifest)


def _run(args: argparse.Namespace) -> None:
    _check_args(args)
    if args.command == "prepare":
        _prepare(args.manifest, args.out, args)
    elif args.command == "index":
        from t3d_data.shards import merge_shards

        print(merge_shards(args.store, manifest=args.manifest,
                           max_bad_fraction=args.max_bad_fraction))
    elif args.command == "import":
        from t3d_data.sources.cli import run_import

        run_import(args)
    elif args.command == "validate":
        from t3d_data.manifest import load_manifest

        records = load_manifest(args.manifest)
        splits: dict[str, int] = {}
        for r in records:
            splits[str(r.split)] = splits.get(str(r.split), 0) + 1
        print(f"{args.manifest}: {len(records)} studies, "
              f"{len({r.patient_id for r in records})} patients, splits {splits}")
    elif args.command == "phantom":
        _phantom(args.out, args)
    elif args.command == "demo":
        manifest = _phantom(args.out / "phantom", args)
        _prepare(manifest, args.out / "store", args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``t3d-data`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="t3d-data: %(levelname)s: %(message)s")
    from t3d_data.errors import T3DDataError

    try:
        _run(args)
    except (T3DDataError, OSError, ValueError) as err:  # OSError: e.g. OUT is a file
        lines = [line for line in str(err).splitlines() if line.strip()] or [repr(err)]
        print("\n".join(f"t3d-data: error: {line}" for line in lines), file=sys.stderr)
        return EXIT_BAD_INPUT
    except ImportError as err:  # e.g. an optional part of the package is missing
        print(f"t3d-data: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("t3d-data: interrupted (rerun to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
