"""Sharded ``prepare``: n processes or machines prepare disjoint parts of one manifest into one
store, then ``t3d-data index`` merges and checks their shard indexes (docs/data.md).

A study belongs to shard ``i`` of ``n`` when the first 8 bytes of ``sha256(study_id)``, read as
an integer, are ``i`` modulo ``n``: the assignment depends only on the id, so editing other lines
of the manifest moves no study between shards. Each shard writes only its own studies' folders
and its own ``index.shard-<i>-of-<n>.json`` (atomically), so shards can run at the same time.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from t3d_data.errors import StoreError

__all__ = ["IndexSummary", "Shard", "merge_shards", "shard_of"]

logger = logging.getLogger(__name__)

SHARD_FORMAT = "t3d-store-shard"
SHARD_FORMAT_VERSION = 1
SHARD_INDEX = re.compile(r"index\.shard-(\d+)-of-(\d+)\.json")


def shard_of(study_id: str, count: int) -> int:
    """The shard (``0 .. count-1``) that prepares ``study_id``."""
    digest = hashlib.sha256(study_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (written ``index/count`` on the command line, e.g. ``0/4``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"--shard must be I/N with N >= 1 and 0 <= I < N, got {self}")

    @classmethod
    def parse(cls, text: str | Shard) -> Shard:
        """Parses ``"I/N"``.

        Raises:
            ValueError: not of the form ``I/N`` with ``0 <= I < N``.
        """
        if isinstance(text, Shard):
            return text
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if m is None:
            raise ValueError(f"--shard must be I/N (e.g. 0/4: the first of 4 shards), got {text!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def index_name(self) -> str:
        """File name of this shard's index inside the store."""
        return f"index.shard-{self.index}-of-{self.count}.json"

    def owns(self, study_id: str) -> bool:
        """Whether this shard prepares ``study_id``."""
        return shard_of(study_id, self.count) == self.index


class QuarantinedStudy(BaseModel):
    """A bad study of a shard (a line of the merged ``quarantine.jsonl``)."""

    model_config = ConfigDict(extra="forbid")

    study_id: str
    image: str
    reason: str


def _shard_index_model():  # StoreRecord lives in store.py, which imports this module lazily
    from t3d_data.store import StoreRecord

    class ShardIndex(BaseModel):
        """``index.shard-<i>-of-<n>.json``: what one shard prepared."""

        model_config = ConfigDict(extra="forbid")

        format: str = SHARD_FORMAT
        version: int = SHARD_FORMAT_VERSION
        shard: tuple[int, int]
        manifest: str
        manifest_sha256: str
        assigned: list[tuple[int, str]]  # (manifest position, study_id) of this shard's studies
        complete: bool  # every assigned study was tried
        quarantined: list[QuarantinedStudy] = []
        studies: list[StoreRecord] = []

    return ShardIndex


_MODEL: type[BaseModel] | None = None


def shard_index_model() -> type[BaseModel]:
    """The pydantic model of a shard index (built once)."""
    global _MODEL
    if _MODEL is None:
        _MODEL = _shard_index_model()
    return _MODEL


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_shard_index(out: Path, shard: Shard, manifest: Path, manifest_sha256: str,
                      assigned: Sequence[tuple[int, str]], entries: Sequence[object],
                      quarantined: Sequence[QuarantinedStudy], *, complete: bool) -> Path:
    """Writes this shard's index atomically (temp file + fsync + rename); returns its path."""
    from t3d_data.store import _write_json_atomic

    index = shard_index_model()(
        shard=(shard.index, shard.count), manifest=str(Path(manifest).resolve()),
        manifest_sha256=manifest_sha256, assigned=list(assigned), complete=complete,
        quarantined=list(quarantined), studies=list(entries))
    path = out / shard.index_name
    _write_json_atomic(path, index.model_dump(mode="json"))
    return path


def read_shard_index(path: Path) -> BaseModel:
    """Reads and validates one shard index.

    Raises:
        StoreError: unreadable, invalid, or of another format.
    """
    try:
        index = shard_index_model().model_validate_json(path.read_bytes())
    except OSError as err:
        raise StoreError(f"{path}: cannot read shard index ({err})") from err
    except ValidationError as err:
        raise StoreError(f"{path}: invalid shard index ({err.error_count()} errors: "
                         f"{err.errors()[0]['msg']}); rerun that shard of `t3d-data prepare "
                         "--shard I/N` after deleting the file") from err
    if index.format != SHARD_FORMAT or index.version != SHARD_FORMAT_VERSION:
        raise StoreError(f"{path}: unsupported shard index format {index.format} v{index.version}")
    m = SHARD_INDEX.fullmatch(path.name)
    if m is None or (int(m.group(1)), int(m.group(2))) != tuple(index.shard):
        raise StoreError(f"{path}: records shard {index.shard[0]}/{index.shard[1]}, which does "
                         "not match its file name; do not rename shard indexes")
    return index


@dataclass
class IndexSummary:
    """Counts of one ``t3d-data index`` run (merged shard indexes).

    Attributes:
        store: the store folder.
        shards: number of shards merged.
        total: studies in the manifest.
        studies: studies in the merged index.
        quarantined: bad studies (merged ``quarantine.jsonl``).
        nbytes: compressed bytes of the indexed studies.
    """

    store: Path
    shards: int
    total: int
    studies: int
    quarantined: int
    nbytes: int

    def __str__(self) -> str:
        return (f"{self.store}: merged {self.shards} shard indexes: {self.studies} of "
                f"{self.total} studies indexed, {self.quarantined} quarantined; "
                f"{self.nbytes / 2**20:.1f} MiB")


def _shown(items: Sequence[str], limit: int = 5) -> str:
    head = ", ".join(f"'{x}'" for x in items[:limit])
    return head + (f" and {len(items) - limit} more" if len(items) > limit else "")


def merge_shards(store_dir: str | Path, *, manifest: str | Path | None = None,
                 max_bad_fraction: float = 0.05) -> IndexSummary:
    """Merges the shard indexes of a store into its ``index.json`` and checks them.

    Checks that the shard indexes of all ``n`` shards are present and complete and were made
    from one manifest (same sha256), that every study of the manifest is in exactly one shard's
    studies or quarantine and in the shard its id hashes to, and that every indexed study's
    arrays are in the store. Then writes ``index.json`` (manifest order, report groups over all
    studies: the same file a one-process ``prepare`` writes) and ``quarantine.jsonl``
    atomically.

    Args:
        store_dir: the store the shards prepared into.
        manifest: the manifest the shards read (default: the path they recorded); checked
            against the recorded sha256.
        max_bad_fraction: fail (after writing the index) when more than this fraction of the
            manifest is quarantined.

    Returns:
        The merged counts.

    Raises:
        StoreError: a shard is missing, incomplete or inconsistent, studies are missing or
            duplicated, arrays are missing, or too many studies are bad.
        ManifestError: the manifest is invalid.
    """
    from t3d_data.manifest import load_manifest
    from t3d_data.store import (
        MARKER_NAME,
        QUARANTINE_NAME,
        STUDIES_DIR,
        _write_index,
        _write_json_lines_atomic,
    )

    if not 0 <= max_bad_fraction <= 1:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    out = Path(store_dir)
    if not (out / MARKER_NAME).is_file():
        raise StoreError(f"{out}: not a store created by t3d-data prepare (no {MARKER_NAME}); "
                         "run `t3d-data prepare MANIFEST STORE --shard I/N` for every shard first")
    files = sorted((p for p in out.iterdir() if SHARD_INDEX.fullmatch(p.name)),
                   key=lambda p: tuple(int(g) for g in SHARD_INDEX.fullmatch(p.name).groups()))
    if not files:
        raise StoreError(f"{out}: no shard indexes (index.shard-I-of-N.json); run `t3d-data "
                         "prepare MANIFEST STORE --shard I/N` for I = 0 .. N-1 first")
    counts = sorted({int(SHARD_INDEX.fullmatch(p.name).group(2)) for p in files})
    if len(counts) > 1:
        raise StoreError(f"{out}: shard indexes of different shard counts N = "
                         f"{', '.join(map(str, counts))} ({', '.join(p.name for p in files)}); "
                         "delete the ones of the old run and rerun `t3d-data index`")
    n = counts[0]
    shards = [read_shard_index(p) for p in files]
    have = {s.shard[0] for s in shards}
    missing = [f"{i}/{n}" for i in range(n) if i not in have]
    if missing:
        raise StoreError(f"{out}: {len(missing)} of {n} shards have not run (no index for shard "
                         f"{', '.join(missing)}); run `t3d-data prepare MANIFEST {out} --shard "
                         f"{missing[0]}` for each, then `t3d-data index {out}` again")
    unfinished = [f"{s.shard[0]}/{n}" for s in shards if not s.complete]
    if unfinished:
        raise StoreError(f"{out}: shard {', '.join(unfinished)} did not finish (still running, "
                         "or killed); rerun it with the same --shard to resume, then "
                         f"`t3d-data index {out}` again")
    digests = {s.manifest_sha256 for s in shards}
    if len(digests) > 1:
        raise StoreError(f"{out}: the shards read different manifests (" + "; ".join(
            f"shard {s.shard[0]}/{n}: {s.manifest} sha256 {s.manifest_sha256[:12]}"
            for s in shards) + "); rerun every shard with the same manifest")
    (digest,) = digests

    # the manifest: the given one, else the path the shards recorded (if it is still there)
    path = Path(manifest) if manifest is not None else Path(shards[0].manifest)
    if path.is_file():
        if file_sha256(path) != digest:
            raise StoreError(f"{path}: the manifest changed since the shards were prepared "
                             f"(sha256 {digest[:12]} then); rerun every shard with it, then "
                             "`t3d-data index` again")
        order = [(pos, r.study_id) for pos, r in enumerate(load_manifest(path, check_files=False))]
    elif manifest is not None:
        raise StoreError(f"{path}: manifest not found; give the manifest the shards read")
    else:
        logger.warning("%s: manifest not found; checking the shards against the study lists "
                       "they recorded", path)
        order = sorted(p for s in shards for p in map(tuple, s.assigned))

    # every study in exactly one shard, the shard it hashes to
    expected = {sid for _, sid in order}
    seen: dict[str, str] = {}
    duplicate, wrong, extra = [], [], []
    for s in shards:
        assigned = {sid for _, sid in s.assigned}
        ids = [e.study_id for e in s.studies] + [q.study_id for q in s.quarantined]
        for sid in ids:
            if sid in seen:
                duplicate.append(sid)
            seen[sid] = f"{s.shard[0]}/{n}"
            if sid not in expected:
                extra.append(sid)
            elif shard_of(sid, n) != s.shard[0] or sid not in assigned:
                wrong.append(sid)
    absent = [sid for _, sid in order if sid not in seen]
    problems = []
    if absent:
        problems.append(f"{len(absent)} studies of the manifest are in no shard: {_shown(absent)}")
    if duplicate:
        problems.append(f"{len(duplicate)} studies are in more than one shard: {_shown(duplicate)}")
    if wrong:
        problems.append(f"{len(wrong)} studies are in a shard they do not hash to: {_shown(wrong)}")
    if extra:
        problems.append(f"{len(extra)} indexed studies are not in the manifest: {_shown(extra)}")
    if problems:
        raise StoreError(f"{out}: the shard indexes do not cover the manifest {path} exactly "
                         f"once: " + "; ".join(problems) + "; rerun the shards named by "
                         "--shard with this manifest, then `t3d-data index` again")

    entries = {e.study_id: e for s in shards for e in s.studies}
    no_arrays = [e.study_id for e in entries.values()
                 if not (out / STUDIES_DIR / e.key / "image" / "zarr.json").is_file()
                 or (e.has_mask and not (out / STUDIES_DIR / e.key / "mask" / "zarr.json").is_file())]
    if no_arrays:
        raise StoreError(f"{out}: {len(no_arrays)} indexed studies have no arrays in "
                         f"{out / STUDIES_DIR}: {_shown(no_arrays)}; rerun their shards "
                         f"({', '.join(sorted({seen[s] for s in no_arrays}))}) to rewrite them")

    final = [entries[sid] for _, sid in order if sid in entries]
    bad = {q.study_id: q for s in shards for q in s.quarantined}
    _write_index(out, final)
    _write_json_lines_atomic(out / QUARANTINE_NAME,
                             [bad[sid].model_dump() for _, sid in order if sid in bad])
    summary = IndexSummary(out, n, len(order), len(final), len(bad),
                           sum(e.nbytes for e in final))
    allowed = math.floor(max_bad_fraction * len(order) + 1e-9)
    if len(bad) > allowed or not final:
        raise StoreError(f"{out}: {len(bad)} of {len(order)} studies are quarantined, more than "
                         f"max_bad_fraction={max_bad_fraction:g} allows ({allowed}): "
                         f"{_shown(sorted(bad))}; the index keeps the {len(final)} good ones; "
                         f"the reasons are in {out / QUARANTINE_NAME}; fix the inputs or raise "
                         "--max-bad-fraction")
    logger.info("%s", summary)
    return summary

