"""The prepared store: one chunked zarr v3 group per study plus ``index.json`` (see docs/data.md).

``prepare`` ingests a manifest once (resumable, atomic per study, bad studies quarantined) so
that a random crop later reads about its own bytes instead of the whole volume (docs/method.md,
"Data"). It only writes into a new or empty folder or a store it created (``t3d-store.json``),
and only removes its own entries. ``VolumeStore`` opens a prepared store for reading.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_serializer

from t3d_data.errors import PrepareAborted, StoreError, VolumeReadError
from t3d_data.header import header_meta
from t3d_data.manifest import StudyRecord, load_manifest
from t3d_data.readers import DEFAULT_MAX_BYTES, DEFAULT_MAX_VOXELS, read_image, read_mask
from t3d_data.text import load_report, report_group_ids

if TYPE_CHECKING:
    from t3d_data.shards import Shard

__all__ = ["INDEX_NAME", "MARKER_NAME", "QUARANTINE_NAME", "PrepareSummary", "StoreRecord",
           "VolumeStore", "prepare", "source_hash"]

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
QUARANTINE_NAME = "quarantine.jsonl"
MARKER_NAME = "t3d-store.json"  # written by prepare into every store it creates
STUDIES_DIR = "studies"
FORMAT = "t3d-store"
FORMAT_VERSION = 1
_TMP_PREFIX = ".tmp-"
_KEY = r"[A-Za-z0-9._-]*-[0-9a-f]{6}-[0-9a-f]{12}"
# prepare's own temporary entries (of this or a killed run); nothing else is ever removed
_TMP_STUDY = re.compile(rf"\.tmp-{_KEY}\.\d+")
_SHARD_INDEX = r"index\.shard-\d+-of-\d+\.json"  # t3d_data.shards: one per shard of a manifest
_TMP_FILE = re.compile(rf"\.tmp-(?:{re.escape(INDEX_NAME)}|{re.escape(QUARANTINE_NAME)}|"
                       rf"{re.escape(MARKER_NAME)}|{_SHARD_INDEX})\.\d+")
# Test hook: seconds to sleep between writing a study's temporary folder and renaming it, so
# tests can SIGKILL a prepare run mid-study. Never set in normal use.
_TEST_DELAY_ENV = "T3D_DATA_PREPARE_TEST_DELAY"


class StoreRecord(BaseModel):
    """Metadata of one prepared study (an entry of ``index.json``).

    ``shape`` and ``chunks`` are spatial ``(X, Y, Z)``. A multi-channel study (``n_channels >
    1``, e.g. BraTS' four MRI sequences) stores its image as one ``(C, X, Y, Z)`` array chunked
    ``(1, *chunks)``; ``channels`` names the channels when the manifest did. ``modality``
    ``"CT"`` images are int16 HU, ``"MR"`` images float32 (no HU conversion). The three fields
    are left out of ``index.json`` at their defaults (1, ``None``, ``"CT"``), so a
    single-channel CT store is written exactly as before they existed.
    """

    model_config = ConfigDict(extra="forbid")

    study_id: str
    patient_id: str
    split: str | None
    key: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: list[list[float]]
    chunks: tuple[int, int, int]
    report: str | None
    replaced_bytes: int
    labels: dict[str, int]
    has_mask: bool
    source: str
    source_sha256: str
    mask_source: str | None
    mask_sha256: str | None
    group: int
    nbytes: int
    language: str = "en"
    n_channels: int = 1
    channels: list[str] | None = None
    modality: Literal["CT", "MR"] = "CT"

    @model_serializer(mode="wrap")
    def _omit_single_channel_defaults(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for name, default in _CHANNEL_DEFAULTS.items():
            if name in data and data[name] == default:
                del data[name]
        return data


_CHANNEL_DEFAULTS: dict[str, Any] = {"n_channels": 1, "channels": None, "modality": "CT"}


class _Index(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    version: int = FORMAT_VERSION
    finding_names: list[str] = []
    studies: list[StoreRecord] = []


@dataclass
class PrepareSummary:
    """Counts of one ``prepare`` run.

    Attributes:
        store: the store folder.
        total: studies in the manifest.
        prepared: studies written in this run.
        skipped: studies already present with the same source hash.
        quarantined: bad studies (listed in ``quarantine.jsonl``).
        bytes_written: compressed bytes written in this run.
        seconds: wall-clock time.
        workers: processes that read and wrote studies.
        shard: ``"I/N"`` for a sharded run (``total`` counts the shard's studies), else None.
        peak_rss: largest peak resident memory of one process that prepared studies (a
            worker, or this process with one worker), bytes.
        cpu_seconds: CPU time spent by this process during the run plus the workers' (from
            their start; the forkserver's one-off imports are not counted).
    """

    store: Path
    total: int
    prepared: int
    skipped: int
    quarantined: int
    bytes_written: int
    seconds: float
    workers: int = 1
    shard: str | None = None
    peak_rss: int = 0
    cpu_seconds: float = 0.0

    def __str__(self) -> str:
        where = f"{self.store} (shard {self.shard})" if self.shard else f"{self.store}"
        return (f"{where}: {self.total} studies: {self.prepared} prepared, {self.skipped} "
                f"skipped (unchanged), {self.quarantined} quarantined; "
                f"{self.bytes_written / 2**20:.1f} MiB written in {self.seconds:.1f} s")


def source_hash(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's sorted files (names and bytes, non-recursive).

    Raises:
        VolumeReadError: the path does not exist.
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise VolumeReadError(f"{path}: not found")
    for f in files:
        if len(files) > 1 or path.is_dir():
            h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def _key_prefix(study_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", study_id)[:80].lstrip(".") or "study"
    return f"{safe}-{hashlib.sha1(study_id.encode()).hexdigest()[:6]}-"


def _key(study_id: str, digest: str) -> str:
    return _key_prefix(study_id) + digest[:12]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_json_lines_atomic(path: Path, rows: Sequence[Any]) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _claim_store(out: Path) -> None:
    """Makes ``out`` a store folder, or refuses one that ``prepare`` did not create.

    New or empty folders get the marker file; a folder with the marker is ours; a store written
    before markers existed (a valid ``index.json``, or only entries named the way prepare names
    them, e.g. what a killed first run left) is adopted. Anything else is refused, so that
    prepare never writes (or deletes) inside a folder of the user's.
    """
    marker = out / MARKER_NAME
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out}: exists and is not a folder; give a new or empty folder as OUT")
    if marker.is_file():
        try:
            ok = json.loads(marker.read_text(encoding="utf-8")).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise StoreError(f"{marker}: not a t3d-store marker; give a new or empty folder as OUT")
        return
    if out.is_dir() and any(out.iterdir()) and not _only_own_names(out):
        try:
            _read_index(out)
        except StoreError:
            raise StoreError(
                f"{out}: not a store created by t3d-data prepare (no {MARKER_NAME} marker) and "
                "not empty; prepare only writes into a new or empty folder or its own store, so "
                "that nothing of yours is deleted: give a new or empty folder as OUT") from None
        logger.warning("%s: adopting a store prepared before %s markers existed", out,
                       MARKER_NAME)
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(marker, {"format": FORMAT, "version": FORMAT_VERSION,
                                "created_by": "t3d-data prepare",
                                "note": "prepare only writes and removes its own entries here"})


def _only_own_names(out: Path) -> bool:
    """True when every entry of ``out`` (and of its ``studies/``) is named as prepare names its
    own entries (an unmarked folder left by an older version's killed first run). A folder
    with an ``index.json`` is judged by that index instead."""
    top = {QUARANTINE_NAME, STUDIES_DIR}
    for entry in out.iterdir():
        if (entry.name not in top and not _TMP_FILE.fullmatch(entry.name)
                and not re.fullmatch(_SHARD_INDEX, entry.name)):
            return False
    studies = out / STUDIES_DIR
    if studies.exists():
        if not studies.is_dir():
            return False
        for entry in studies.iterdir():
            if not (entry.is_dir() and (_TMP_STUDY.fullmatch(entry.name)
                                        or re.fullmatch(_KEY, entry.name))):
                return False
    return True


def _remove_own_temps(out: Path, prefixes: set[str] | None = None,
                      shard_index: str | None = None) -> None:
    """Removes the temporary entries a killed run left (only names prepare itself uses).

    A shard (``prefixes`` given) removes only the temporary study folders of its own studies'
    keys and only its own temporary shard index, so that it never touches what a concurrent
    shard is writing.
    """
    for entry in (out / STUDIES_DIR).iterdir():
        if _TMP_STUDY.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            key = entry.name[len(_TMP_PREFIX):].rsplit(".", 1)[0]
            if prefixes is None or key[:-12] in prefixes:
                shutil.rmtree(entry, ignore_errors=True)
    for entry in out.iterdir():
        if _TMP_FILE.fullmatch(entry.name) and entry.is_file() and (
                shard_index is None or entry.name.startswith(f"{_TMP_PREFIX}{shard_index}.")):
            entry.unlink(missing_ok=True)


def _write_index(out: Path, entries: Sequence[StoreRecord]) -> None:
    groups = _group_ids(entries)
    studies = [e.model_copy(update={"group": g}) for e, g in zip(entries, groups, strict=True)]
    findings = sorted({name for e in studies for name in e.labels})
    index = _Index(finding_names=findings, studies=studies)
    _write_json_atomic(out / INDEX_NAME, index.model_dump(mode="json"))


def _group_ids(entries: Sequence[StoreRecord]) -> list[int]:
    """:func:`report_group_ids` of the reports; a study without a report is its own group."""
    gids = report_group_ids([e.report for e in entries if e.report is not None])
    ids, n = iter(gids), max(gids, default=-1) + 1
    out = []
    for e in entries:
        if e.report is not None:
            out.append(next(ids))
        else:
            out.append(n)
            n += 1
    return out


def _is_url(path: str | Path) -> bool:
    """An fsspec URL (``s3://``, ``gs://``, ``memory://``, ``file://`` ...), not a local path."""
    return isinstance(path, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def _read_index(out: Path | str, storage_options: dict[str, Any] | None = None) -> _Index:
    path = f"{out}/{INDEX_NAME}" if isinstance(out, str) else out / INDEX_NAME
    try:
        if isinstance(out, str):  # an fsspec URL (VolumeStore)
            import fsspec

            with fsspec.open(path, "rb", **(storage_options or {})) as f:
                data = f.read()
        else:
            data = path.read_bytes()
        index = _Index.model_validate_json(data)
    except FileNotFoundError as err:
        raise StoreError(f"{out}: not a prepared store ({INDEX_NAME} missing); run "
                         "`t3d-data prepare MANIFEST OUT` first (after `prepare --shard I/N`: "
                         "`t3d-data index OUT`)") from err
    except ValidationError as err:
        raise StoreError(f"{path}: invalid store index ({err.error_count()} errors: "
                         f"{err.errors()[0]['msg']}); re-run prepare into a new folder") from err
    if index.format != FORMAT or index.version != FORMAT_VERSION:
        raise StoreError(f"{path}: unsupported store format {index.format} v{index.version}")
    return index


def _write_study(out: Path, key: str, image: np.ndarray, mask: np.ndarray | None,
                 chunks: tuple[int, int, int]) -> int:
    """Writes one study into a temporary folder, then renames it into place (atomic).

    ``chunks`` are spatial; a ``(C, X, Y, Z)`` image is chunked ``(1, *chunks)`` (one channel
    per chunk, so a crop of one channel reads only its own bytes).
    """
    import zarr
    from zarr.codecs import BloscCodec

    final = out / STUDIES_DIR / key
    tmp = out / STUDIES_DIR / f"{_TMP_PREFIX}{key}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    codec = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    for name, arr in (("image", image), ("mask", mask)):
        if arr is None:
            continue
        z = group.create_array(name, shape=arr.shape, dtype=arr.dtype,
                               chunks=(1,) * (arr.ndim - 3) + tuple(chunks),
                               compressors=codec, fill_value=0)
        z[...] = arr
    delay = float(os.environ.get(_TEST_DELAY_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return _dir_bytes(final)


def _prepare_one(rec: StudyRecord, out: Path, prev: StoreRecord | None, chunk: int,
                 max_voxels: int, max_bytes: int) -> tuple[StoreRecord, bool]:
    """Returns (entry, written) for one study; raises T3DDataError for a bad study."""
    report = (load_report(rec.report, rec.image_paths[0].parent) if rec.report is not None
              else None)
    digest = _image_hash(rec.image_paths)
    mask_digest = source_hash(rec.mask) if rec.mask is not None else None
    replaced = (report.replaced_bytes if report is not None else 0) + rec.inline_replaced_bytes
    meta = {"patient_id": rec.patient_id, "split": rec.split,
            "report": report.text if report is not None else None,
            "replaced_bytes": replaced, "labels": dict(rec.labels), "language": rec.language}
    if (prev is not None and prev.source_sha256 == digest and prev.mask_sha256 == mask_digest
            and prev.modality == rec.modality and (out / STUDIES_DIR / prev.key).is_dir()):
        return prev.model_copy(update={**meta, "channels": rec.channels}), False
    with header_meta(rec.meta.get("header")):  # metadata for what NIfTI headers lack
        vol = read_image(rec.image_paths, max_voxels=max_voxels, max_bytes=max_bytes,
                         modality=rec.modality, channels=rec.channels)
    mask_arr = None
    if rec.mask is not None:
        mask = read_mask(rec.mask, max_voxels=max_voxels, max_bytes=max_bytes)
        if mask.array.shape != vol.spatial_shape:
            raise VolumeReadError(f"{rec.mask}: mask shape {mask.array.shape} != image shape "
                                  f"{vol.spatial_shape} (after RAS reorientation)")
        if not np.allclose(mask.affine, vol.affine, atol=1e-2):
            raise VolumeReadError(f"{rec.mask}: mask affine differs from the image's; resample "
                                  "the mask onto the image grid")
        mask_arr = mask.array
    chunks = tuple(min(chunk, s) for s in vol.spatial_shape)
    key = _key(rec.study_id, digest)
    nbytes = _write_study(out, key, vol.array, mask_arr, chunks)  # type: ignore[arg-type]
    source = (str(rec.image) if not isinstance(rec.image, list)
              else json.dumps([str(p) for p in rec.image]))
    entry = StoreRecord(
        study_id=rec.study_id, key=key, shape=vol.spatial_shape, spacing=vol.spacing,
        affine=vol.affine.tolist(), chunks=chunks, has_mask=mask_arr is not None,
        source=source, source_sha256=digest,
        mask_source=str(rec.mask) if rec.mask is not None else None, mask_sha256=mask_digest,
        group=0, nbytes=nbytes, n_channels=vol.n_channels, channels=rec.channels,
        modality=rec.modality, **meta)
    return entry, True


def _image_hash(paths: Sequence[Path]) -> str:
    """:func:`source_hash` of one image path; for a list of channel files, the sha256 of their
    hashes in order (so reordering the channels is a change)."""
    if len(paths) == 1:
        return source_hash(paths[0])
    return hashlib.sha256("\n".join(source_hash(p) for p in paths).encode()).hexdigest()


def prepare(
    manifest_path: str | Path,
    out_dir: str | Path,
    *,
    chunk: int = 64,
    max_bad_fraction: float = 0.05,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: bool = True,
    workers: int = 1,
    shard: str | Shard | None = None,
) -> PrepareSummary:
    """Prepares a manifest into a chunked zarr v3 store (resumable; see docs/data.md).

    Each study is written into a temporary folder and renamed into place, then ``index.json``
    is replaced atomically, so a killed run never leaves a half study that looks complete. A
    rerun skips studies whose source content hash is unchanged (updating their metadata).
    Every study is tried; bad ones are quarantined and the verdict comes at the end.

    ``out_dir`` must be new, empty, or a store that ``prepare`` created (it holds the
    ``t3d-store.json`` marker). Inside it, ``prepare`` only removes its own temporary entries
    and the folders of studies its index names; anything else is left untouched.

    With ``workers > 1`` a process pool reads and writes the studies (one study per worker at
    a time, so a worker's memory is bounded by the largest volume it reads); this process
    alone writes the index. The store is the same as with one worker. Ctrl-C or SIGTERM stops
    the workers and keeps the finished studies in the index (a rerun resumes). From a script,
    call it under ``if __name__ == "__main__":`` when ``workers > 1`` (the workers import the
    main module, as with any ``multiprocessing`` code).

    With ``shard="I/N"`` only the studies of shard I of N are prepared
    (:func:`t3d_data.shards.shard_of`), and recorded in ``index.shard-I-of-N.json`` instead of
    ``index.json``; the N shards may run at once (processes or machines sharing ``out_dir``),
    each resumable on its own. :func:`t3d_data.shards.merge_shards` (``t3d-data index``) then
    checks them and writes ``index.json``.

    Args:
        manifest_path: JSONL/CSV manifest (see :func:`t3d_data.load_manifest`).
        out_dir: store folder (created).
        chunk: chunk edge in voxels (chunks are ``chunk``³, clipped to the volume).
        max_bad_fraction: fail when more than this fraction of the manifest (of the shard) is
            bad.
        max_voxels: refuse volumes with more voxels (checked before allocating).
        max_bytes: refuse volumes whose header declares more decoded voxel bytes (voxels x
            the stored datatype's size; checked before allocating).
        progress: show a tqdm progress bar.
        workers: processes that read and write studies (1: this process).
        shard: ``"I/N"`` or a :class:`t3d_data.shards.Shard`; ``None`` prepares everything.

    Returns:
        The run's counts.

    Raises:
        ManifestError: the manifest is invalid (nothing is written).
        StoreError: ``out_dir`` is a non-empty folder that ``prepare`` did not create (nothing
            is written).
        PrepareAborted: after trying every study: more than ``max_bad_fraction`` of them are
            bad, or none is usable (the index keeps every good one).
        PrepareWorkerError: a worker process died (the index keeps the finished studies).
        ValueError: bad arguments.
    """
    from tqdm.auto import tqdm

    from t3d_data.parallel import cpu_seconds, run_tasks
    from t3d_data.shards import QuarantinedStudy, Shard, file_sha256, write_shard_index

    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if not 0 <= max_bad_fraction <= 1:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    if max_voxels < 1 or max_bytes < 1:
        raise ValueError(f"max_voxels and max_bytes must be >= 1, got {max_voxels}, {max_bytes}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    spec = Shard.parse(shard) if shard is not None else None
    start, cpu_start = time.perf_counter(), cpu_seconds()
    manifest_path = Path(manifest_path)
    everything = load_manifest(manifest_path, check_files=False)
    records = everything if spec is None else [r for r in everything if spec.owns(r.study_id)]
    out = Path(out_dir)
    _claim_store(out)
    (out / STUDIES_DIR).mkdir(exist_ok=True)
    old = _previous_entries(out, spec)
    if spec is None:
        _remove_own_temps(out)  # half-written studies of a killed run
    else:  # only this shard's: another shard may be writing right now
        _remove_own_temps(out, {_key_prefix(s) for s in [*(r.study_id for r in records), *old]},
                          spec.index_name)
        digest = file_sha256(manifest_path)
        assigned = [(pos, r.study_id) for pos, r in enumerate(everything)
                    if spec.owns(r.study_id)]
    current = dict(old)
    allowed_bad = math.floor(max_bad_fraction * len(records) + 1e-9)
    prepared = skipped = written = rss = 0
    bad: dict[int, QuarantinedStudy] = {}
    worker_cpu: dict[int, float] = {}  # pid -> CPU seconds, for workers other than this process
    unlinked: list[str] = []  # replaced study folders, removed once the index no longer names them
    last = [0.0, 0.0]  # end and cost of the last index write

    def save(complete: bool = False) -> None:
        t0 = time.perf_counter()
        entries = ([current[r.study_id] for r in records if r.study_id in current] if complete
                   else list(current.values()))
        if spec is None:
            _write_index(out, entries)
        else:
            write_shard_index(out, spec, manifest_path, digest, assigned, entries,
                              [bad[p] for p in sorted(bad)], complete=complete)
        for key in unlinked:
            shutil.rmtree(out / STUDIES_DIR / key, ignore_errors=True)
        unlinked.clear()
        last[:] = [time.perf_counter(), time.perf_counter() - t0]

    def save_soon() -> None:  # at most ~10% of the time goes into rewriting a large index
        if time.perf_counter() - last[0] >= 10 * last[1]:
            save()

    tasks = [(rec, out, old.get(rec.study_id), chunk, max_voxels, max_bytes) for rec in records]
    outcomes = run_tasks(_prepare_one, tasks, workers, labels=[r.study_id for r in records])
    try:
        for outcome in tqdm(outcomes, total=len(tasks), desc="prepare", unit="study",
                            disable=not progress):
            rec = records[outcome.position]
            rss = max(rss, outcome.peak_rss)
            if outcome.pid != os.getpid():
                worker_cpu[outcome.pid] = max(worker_cpu.get(outcome.pid, 0.0),
                                              outcome.cpu_seconds)
            if outcome.error is not None:
                bad[outcome.position] = QuarantinedStudy(study_id=rec.study_id,
                                                         image=str(rec.image),
                                                         reason=outcome.error)
                logger.warning("quarantined study '%s': %s", rec.study_id, outcome.error)
                if current.pop(rec.study_id, None) is not None:
                    save_soon()
                continue
            entry, was_written = outcome.value
            prev = current.get(rec.study_id)
            current[rec.study_id] = entry
            if was_written:
                prepared += 1
                written += entry.nbytes
                if prev is not None and prev.key != entry.key:
                    unlinked.append(prev.key)
            else:
                skipped += 1
            save_soon()
    except BaseException:
        outcomes.close()  # stops the workers first
        save()  # the index names every study finished so far: a rerun resumes from there
        raise
    final = [current[r.study_id] for r in records if r.study_id in current]
    if spec is None:
        _write_json_lines_atomic(out / QUARANTINE_NAME, [bad[p].model_dump() for p in sorted(bad)])
    save(complete=True)
    others = (None if spec is None else
              {_key_prefix(r.study_id) for r in everything if not spec.owns(r.study_id)})
    _remove_stale_studies(out, final, old.values(), records, others=others)
    if len(bad) > allowed_bad or (not final and (records or spec is None)):
        where = out / (QUARANTINE_NAME if spec is None else spec.index_name)
        raise PrepareAborted(prepared, skipped, len(bad), len(records), max_bad_fraction,
                             bad=[(b.study_id, b.reason) for _, b in sorted(bad.items())],
                             quarantine=where, store=out)
    summary = PrepareSummary(out, len(records), prepared, skipped, len(bad), written,
                             time.perf_counter() - start, workers=workers,
                             shard=None if spec is None else str(spec), peak_rss=rss,
                             cpu_seconds=cpu_seconds() - cpu_start + sum(worker_cpu.values()))
    logger.info("%s", summary)
    return summary


def _previous_entries(out: Path, spec: Shard | None) -> dict[str, StoreRecord]:
    """What an earlier run prepared: the shard's own index, else ``index.json`` (the studies a
    shard owns, when it is one)."""
    from t3d_data.shards import read_shard_index

    if spec is not None and (out / spec.index_name).exists():
        return {e.study_id: e for e in read_shard_index(out / spec.index_name).studies}
    if not (out / INDEX_NAME).exists():
        return {}
    return {e.study_id: e for e in _read_index(out).studies
            if spec is None or spec.owns(e.study_id)}


def _remove_stale_studies(out: Path, final: Sequence[StoreRecord], old: Any,
                          records: Sequence[StudyRecord], others: set[str] | None = None) -> None:
    """Removes study folders of this store that the index no longer names.

    Only names that prepare gives are removed (a previous index's key, or the key pattern of a
    study id it knows); any other entry is left untouched and reported. A shard passes the key
    prefixes of the other shards' studies as ``others``: those folders are not its to judge,
    and it reports nothing (a concurrent shard may be writing).
    """
    keep = {e.key for e in final}
    old = list(old)
    ours = {e.key for e in old}
    ids = {r.study_id for r in records} | {e.study_id for e in old}
    prefixes = {_key_prefix(sid) for sid in ids}
    foreign = []
    for folder in sorted((out / STUDIES_DIR).iterdir()):
        name = folder.name
        if name in keep:
            continue
        known = re.fullmatch(_KEY, name) is not None
        if others is not None and (not known or name[:-12] in others) and name not in ours:
            continue
        mine = name in ours or (known and name[:-12] in prefixes)
        if mine and folder.is_dir() and not folder.is_symlink():
            logger.info("removing study folder not in the manifest: %s", name)
            shutil.rmtree(folder, ignore_errors=True)
        else:
            foreign.append(name)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more"
                                          if len(foreign) > 5 else "")
        logger.warning("%s: left %d entr%s not made by prepare untouched: %s",
                       out / STUDIES_DIR, len(foreign), "y" if len(foreign) == 1 else "ies", shown)


class VolumeStore:
    """Read access to a prepared store.

    Args:
        path: the store folder (holding ``index.json``), or the URL of a store copied to any
            file system fsspec and zarr support (``s3://bucket/store``, ``gs://...``,
            ``memory://...``, ``file:///...``); a plain local path reads chunk files directly
            (fast path), a URL reads through zarr.
        storage_options: fsspec options for a URL (credentials, endpoint, ...).

    Raises:
        StoreError: not a store, or an unsupported/corrupt index.

    >>> store = VolumeStore("out/store")          # doctest: +SKIP
    >>> crop = store.read(0, (slice(0, 96), slice(0, 96), slice(0, 96)))  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, storage_options: dict[str, Any] | None = None):
        self.url: str | None = str(path).rstrip("/") if _is_url(path) else None
        self.storage_options = dict(storage_options or {})
        self.path: Path | str = self.url if self.url is not None else Path(path)
        index = _read_index(self.path, self.storage_options)
        self.records: list[StoreRecord] = index.studies
        self.finding_names: list[str] = index.finding_names
        self._arrays: dict[tuple[int, str], Any] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"VolumeStore({str(self.path)!r}, studies={len(self)})"

    def indices(self, split: str | None = None) -> list[int]:
        """Study indices of one split (all studies when ``split`` is ``None``)."""
        return [i for i, r in enumerate(self.records) if split is None or r.split == split]

    def shape(self, i: int) -> tuple[int, int, int]:
        """Voxel shape ``(X, Y, Z)`` of study ``i`` (from the index; no I/O); spatial only,
        see :meth:`n_channels`."""
        return self.records[i].shape

    def n_channels(self, i: int) -> int:
        """Image channels of study ``i`` (1 for CT; e.g. 4 for BraTS)."""
        return self.records[i].n_channels

    def array(self, i: int, name: str = "image") -> Any:
        """The zarr array of study ``i`` (``"image"`` or ``"mask"``), opened once and cached."""
        cached = self._arrays.get((i, name))
        if cached is None:
            import zarr

            rec = self.records[i]
            if self.url is not None:
                folder = f"{self.url}/{STUDIES_DIR}/{rec.key}/{name}"
                options = {"storage_options": self.storage_options or None}
            else:
                folder, options = self.path / STUDIES_DIR / rec.key / name, {}
            try:
                cached = zarr.open_array(str(folder), mode="r", zarr_format=3, **options)
            except Exception as err:  # zarr raises FileNotFoundError / its own errors
                raise StoreError(f"study '{rec.study_id}': cannot open {folder} ({err})") from err
            self._arrays[(i, name)] = cached
        return cached

    def read(self, i: int, slices: tuple[slice, ...] | None = None) -> np.ndarray:
        """Reads study ``i`` (or a box of it), touching only the chunks the box overlaps.

        Args:
            i: study index.
            slices: up to three slices along ``(X, Y, Z)``; ``None`` reads the whole volume.

        Returns:
            The image: int16 HU (CT) or float32 (MR); ``(x, y, z)`` for a single-channel
            study, ``(C, x, y, z)`` (every channel) for a multi-channel one.
        """
        return self._read(i, "image", slices)

    def read_mask(self, i: int, slices: tuple[slice, ...] | None = None) -> np.ndarray:
        """Reads the label map of study ``i`` (uint8 or int16).

        Raises:
            StoreError: the study has no mask.
        """
        if not self.records[i].has_mask:
            raise StoreError(f"study '{self.records[i].study_id}' has no mask")
        return self._read(i, "mask", slices)

    def _read(self, i: int, name: str, slices: tuple[slice, ...] | None) -> np.ndarray:
        rec = self.records[i]
        lead = rec.n_channels if name == "image" and rec.n_channels > 1 else None
        fast = self._fast_layout(i, name)
        box = _box(slices, rec.shape) if fast is not None else None
        if box is None:
            where = tuple(slices) if slices is not None else (...,)
            if lead is not None:
                where = (slice(None), *where)
            return np.asarray(self.array(i, name)[where])
        if lead is not None:
            box = [(0, lead), *box]
        return _read_chunks(self.path / STUDIES_DIR / rec.key / name, box, *fast)

    def _fast_layout(self, i: int, name: str) -> tuple[tuple[int, ...], np.dtype, Any] | None:
        """(chunks, dtype, fill) when the array has the layout ``prepare`` writes, else None.

        zarr-python spends about 1 ms of overhead per chunk; for that one known layout (regular
        grid, default "/" chunk keys, little-endian bytes + blosc) we read and decode the chunk
        files directly, which makes small chunks cheap. Anything else goes through zarr.
        """
        key = (i, f"{name}:layout")
        if self.url is not None:  # object storage: zarr reads the chunks (through fsspec)
            return None
        if key not in self._arrays:
            layout = None
            try:
                meta = json.loads((self.path / STUDIES_DIR / self.records[i].key / name
                                   / "zarr.json").read_text(encoding="utf-8"))
                codecs = [c["name"] for c in meta["codecs"]]
                if (codecs == ["bytes", "blosc"]
                        and meta["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                        and meta["chunk_grid"]["name"] == "regular"
                        and meta["chunk_key_encoding"] == {"name": "default",
                                                           "configuration": {"separator": "/"}}
                        and meta["data_type"] in ("int16", "uint8", "float32")):
                    layout = (tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]),
                              np.dtype(meta["data_type"]).newbyteorder("<"), meta["fill_value"])
            except (OSError, KeyError, ValueError, TypeError):
                layout = None
            self._arrays[key] = layout
        return self._arrays[key]


def _box(slices: tuple[slice, ...] | None, shape: tuple[int, ...]
         ) -> list[tuple[int, int]] | None:
    """(start, stop) per axis for plain step-1 slices, else None (zarr handles the rest)."""
    slices = tuple(slices or ())
    if len(slices) > len(shape) or any(not isinstance(s, slice) for s in slices):
        return None
    box = []
    for dim, size in enumerate(shape):
        s = slices[dim] if dim < len(slices) else slice(None)
        start, stop, step = s.indices(size)
        if step != 1:
            return None
        box.append((start, max(start, stop)))
    return box


def _read_chunks(folder: Path, box: list[tuple[int, int]], chunks: tuple[int, ...],
                 dtype: np.dtype, fill: Any) -> np.ndarray:
    from numcodecs import blosc

    out = np.empty([b - a for a, b in box], dtype=dtype)
    ranges = [range(a // c, (b - 1) // c + 1) if b > a else range(0)
              for (a, b), c in zip(box, chunks, strict=True)]
    for idx in itertools.product(*ranges):  # (cx, cy, cz), or (cc, cx, cy, cz) with channels
        src, dst = [], []
        for (a, b), c, k in zip(box, chunks, idx, strict=True):
            lo, hi = max(a, k * c), min(b, (k + 1) * c)
            src.append(slice(lo - k * c, hi - k * c))
            dst.append(slice(lo - a, hi - a))
        path = folder.joinpath("c", *map(str, idx))
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            out[tuple(dst)] = fill
            continue
        chunk = np.frombuffer(blosc.decompress(raw), dtype=dtype).reshape(chunks)
        out[tuple(dst)] = chunk[tuple(src)]
    return out.astype(dtype.newbyteorder("="), copy=False)
