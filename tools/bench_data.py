"""Benchmark: random 96³ crops from the chunked store vs a standard MONAI pipeline on .nii.gz.

Synthesises a few CT-sized volumes (~512×512×300 int16, noise + body pattern), saves them as
.nii.gz, prepares them into stores with different chunk sizes, then measures crops/s and bytes
read per crop, cold (page cache dropped) and warm, for (a) MONAI ``LoadImaged`` +
``EnsureChannelFirstd`` + ``ScaleIntensityRanged`` + ``RandSpatialCropSamplesd(num_samples=4)``
and (b) ``t3d_data.CropDataset`` on the store. Results are documented in docs/performance.md.

With ``--prepare-workers 1 2 ...`` it first measures ``t3d-data prepare`` itself: the same
manifest prepared into a fresh store with each worker count (alternating, ``--prepare-repeats``
rounds), reporting volumes/min, MB/s (decoded voxel bytes and .nii.gz bytes), the ratio to 1
worker in the same run, the peak RSS of one worker, and whether every store is byte-identical to
the 1-worker store. ``--no-crops`` skips the crop benchmark.

Usage:
    uv run python tools/bench_data.py --workdir /tmp/t3d_bench [--volumes 3] [--passes 2]
    uv run python tools/bench_data.py --workdir /tmp/t3d_prep --volumes 8 --shape 256 256 200 \
        --prepare-workers 1 2 4 --no-crops
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

CROP = 96
NUM_CROPS = 4


def _io() -> dict[str, int]:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v)
    return out


def drop_cache(paths: list[Path]) -> str:
    """Drops the page cache: globally if permitted, else per file with posix_fadvise."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for root in paths:
            files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
            for p in files:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        return "fadvise(DONTNEED) per file"


def synthesise(workdir: Path, n: int, shape: tuple[int, int, int]) -> Path:
    """Writes n noisy body-like volumes as .nii.gz and a manifest; returns the manifest."""
    import json

    import nibabel as nib

    data = workdir / "nifti"
    data.mkdir(parents=True, exist_ok=True)
    rows = []
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    for i in range(n):
        path = data / f"vol_{i}.nii.gz"
        rows.append({"study_id": f"vol_{i}", "patient_id": f"p{i}", "image": path.name,
                     "report": f"Synthetic study {i}."})
        if path.exists():
            continue
        rng = np.random.default_rng(i)
        body = ((x / 0.85) ** 2 + (y / 0.7) ** 2 < 1)[..., None]
        lungs = ((np.abs(x) - 0.4) ** 2 / 0.09 + y**2 / 0.3 < 1)[..., None]
        vol = np.where(body, np.where(lungs, -850, 40), -1000).astype(np.int16)
        vol = np.broadcast_to(vol, shape).copy()
        vol += rng.integers(-20, 21, size=shape, dtype=np.int16)  # CT-like noise, poorly compressible
        img = nib.Nifti1Image(vol, np.diag([0.7, 0.7, 1.25, 1.0]))
        img.header.set_data_dtype(np.int16)
        nib.save(img, path)
    manifest = data / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return manifest


def bench_monai(files: list[Path], passes: int, seed: int) -> tuple[int, float, dict[str, int]]:
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        RandSpatialCropSamplesd,
        ScaleIntensityRanged,
    )

    pipeline = Compose([
        LoadImaged(keys="image", image_only=True),
        EnsureChannelFirstd(keys="image"),
        ScaleIntensityRanged(keys="image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0,
                             clip=True),
        RandSpatialCropSamplesd(keys="image", roi_size=(CROP,) * 3, num_samples=NUM_CROPS,
                                random_size=False),
    ])
    pipeline.set_random_state(seed)
    crops, io0, t0 = 0, _io(), time.perf_counter()
    for _ in range(passes):
        for f in files:
            out = pipeline({"image": str(f)})
            crops += len(out)
            assert tuple(out[0]["image"].shape[1:]) == (CROP,) * 3
    dt, io1 = time.perf_counter() - t0, _io()
    return crops, dt, {k: io1[k] - io0[k] for k in ("rchar", "read_bytes")}


def bench_store(store_dir: Path, passes: int, seed: int) -> tuple[int, float, dict[str, int]]:
    from t3d_data import CropConfig, CropDataset

    ds = CropDataset(store_dir, CropConfig(crop_size=(CROP,) * 3, num_crops=NUM_CROPS, seed=seed))
    crops, io0, t0 = 0, _io(), time.perf_counter()
    for epoch in range(passes):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            crops += ds[i]["crops"].shape[0]
    dt, io1 = time.perf_counter() - t0, _io()
    return crops, dt, {k: io1[k] - io0[k] for k in ("rchar", "read_bytes")}


def touched_chunk_bytes(store_dir: Path, samples: int = 400, seed: int = 0) -> tuple[float, float]:
    """Mean compressed bytes of the chunks a random crop touches, and decoded voxels / crop voxels."""
    from t3d_data import VolumeStore

    store = VolumeStore(store_dir)
    rng = np.random.default_rng(seed)
    comp, dec = [], []
    for _ in range(samples):
        i = int(rng.integers(len(store)))
        rec = store.records[i]
        start = [int(rng.integers(0, s - CROP + 1)) for s in rec.shape]
        ranges = [range(a // c, (a + CROP - 1) // c + 1) for a, c in zip(start, rec.chunks, strict=True)]
        base = store.path / "studies" / rec.key / "image" / "c"
        total = 0
        for cx in ranges[0]:
            for cy in ranges[1]:
                for cz in ranges[2]:
                    p = base / str(cx) / str(cy) / str(cz)
                    total += p.stat().st_size if p.exists() else 0
        comp.append(total)
        dec.append(np.prod([len(r) for r in ranges]) * np.prod(rec.chunks) / CROP**3)
    return float(np.mean(comp)), float(np.mean(dec))


def _store_digests(store: Path) -> dict[str, str]:
    """sha256 of index.json and of every file of the study folders (not held in memory: the
    1-worker run's peak RSS is this process's)."""
    import hashlib

    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*"))
            if p.is_file() and (p.name == "index.json" or "studies" in p.parts)}


def bench_prepare(manifest: Path, workdir: Path, workers: list[int], repeats: int,
                  chunk: int) -> None:
    """Prints the prepare throughput table: each worker count prepares a fresh store."""
    import shutil
    import statistics

    import nibabel as nib
    from t3d_data import prepare

    files = sorted(manifest.parent.glob("*.nii.gz"))
    decoded = sum(int(np.prod(nib.load(f).shape)) * 2 for f in files)  # int16 voxels
    gz = sum(f.stat().st_size for f in files)
    largest = max(int(np.prod(nib.load(f).shape)) * 2 for f in files)
    times: dict[int, list[float]] = {w: [] for w in workers}
    rss: dict[int, int] = {}
    load: dict[int, list[float]] = {w: [] for w in workers}
    cpu: dict[int, list[float]] = {w: [] for w in workers}
    same: dict[int, bool] = {}
    reference = None
    for r in range(repeats):
        for w in workers:
            out = workdir / f"prep-w{w}"
            shutil.rmtree(out, ignore_errors=True)
            s = prepare(manifest, out, chunk=chunk, progress=False, workers=w)
            times[w].append(s.seconds)
            cpu[w].append(s.cpu_seconds)
            load[w].append(os.getloadavg()[0])  # how busy the machine was (1-min average)
            rss[w] = max(rss.get(w, 0), s.peak_rss)
            print(f"round {r + 1}, {w} worker(s): {s}", flush=True)
            got = _store_digests(out)
            if reference is None:
                reference = got
            same[w] = same.get(w, True) and got == reference
    n = len(files)
    base = statistics.median(times[workers[0]])
    print()
    print(f"prepare: {n} volumes, {decoded / n / 2**20:.0f} MiB decoded (int16) and "
          f"{gz / n / 2**20:.1f} MiB .nii.gz each, chunk {chunk}; median of {repeats} rounds; "
          f"{os.cpu_count()} CPUs")
    print()
    print(f"| workers | s | volumes/min | MB/s decoded | MB/s .nii.gz | vs {workers[0]} worker(s) "
          "| CPU s / volume | peak RSS / worker | load avg | store identical |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for w in workers:
        t = statistics.median(times[w])
        print(f"| {w} | {t:.1f} | {n / t * 60:.1f} | {decoded / t / 1e6:.1f} | {gz / t / 1e6:.1f} "
              f"| {base / t:.2f}x | {statistics.median(cpu[w]) / n:.2f} "
              f"| {rss[w] / 2**20:.0f} MiB | {statistics.mean(load[w]):.1f} "
              f"| {'yes' if same[w] else 'NO'} |")
    print(f"\nlargest volume decoded: {largest / 2**20:.0f} MiB (peak RSS / worker = the "
          "interpreter and libraries + what one study needs). CPU s / volume: this process "
          "and the workers, user + system; equal CPU per volume means the pool adds no work, "
          "so with N free cores the wall time is CPU / N")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/t3d_bench"))
    parser.add_argument("--volumes", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--chunks", type=int, nargs="+", default=(64, 32))
    parser.add_argument("--passes", type=int, default=2, help="passes over the volumes (warm)")
    parser.add_argument("--threads", type=int, default=1, help="torch/numpy/blosc threads")
    parser.add_argument("--prepare-workers", type=int, nargs="+", default=None, metavar="N",
                        help="also measure prepare with these worker counts (first = baseline)")
    parser.add_argument("--prepare-repeats", type=int, default=2,
                        help="rounds over the worker counts (alternating; median reported)")
    parser.add_argument("--no-crops", action="store_true", help="skip the crop benchmark")
    args = parser.parse_args()

    os.environ.setdefault("BLOSC_NTHREADS", str(args.threads))
    from t3d_data import prepare

    t0 = time.perf_counter()
    manifest = synthesise(args.workdir, args.volumes, tuple(args.shape))
    files = sorted((args.workdir / "nifti").glob("*.nii.gz"))
    print(f"synthesised {len(files)} volumes {tuple(args.shape)} in {time.perf_counter() - t0:.1f} s; "
          f".nii.gz {sum(f.stat().st_size for f in files) / len(files) / 2**20:.1f} MiB each")
    if args.prepare_workers:
        bench_prepare(manifest, args.workdir, args.prepare_workers, args.prepare_repeats,
                      args.chunks[0])
    if args.no_crops:
        return
    import torch  # not before the prepare table: 1 worker runs in this process (its peak RSS)

    torch.set_num_threads(args.threads)
    stores = {}
    for c in args.chunks:
        out = args.workdir / f"store{c}"
        s = prepare(manifest, out, chunk=c, progress=False)
        print(f"store chunk {c}³: {s}")
        stores[c] = out

    crop_bytes = CROP**3 * 2
    rows = []
    for mode in ("cold", "warm"):
        for name, fn, target in [("MONAI .nii.gz", bench_monai, files)] + [
                (f"store {c}³ chunks", bench_store, stores[c]) for c in args.chunks]:
            if mode == "cold":
                how = drop_cache(list(target) if isinstance(target, list) else [target])
                passes = 1
            else:
                fn(target, 1, seed=99)  # warm the cache
                passes = args.passes
            crops, dt, io = fn(target, passes, seed=1)
            rows.append((mode, name, crops / dt, io["rchar"] / crops, io["read_bytes"] / crops))
        print(f"cold cache via {how}")
    base = {m: r[2] for r in rows for m in ("cold", "warm") if r[0] == m and r[1].startswith("MONAI")}
    print()
    print(f"| cache | pipeline | crops/s | speed-up | bytes read/crop (rchar) | disk read/crop | read ÷ crop bytes ({crop_bytes / 2**20:.2f} MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for mode, name, cps, rchar, disk in rows:
        print(f"| {mode} | {name} | {cps:.1f} | {cps / base[mode]:.1f}× | {rchar / 2**20:.2f} MiB | "
              f"{disk / 2**20:.2f} MiB | {rchar / crop_bytes:.2f}× |")
    print()
    print("| chunks | compressed bytes of touched chunks / crop | ÷ crop bytes | decoded voxels ÷ crop voxels |")
    print("|---|---:|---:|---:|")
    for c, path in stores.items():
        comp, dec = touched_chunk_bytes(path)
        print(f"| {c}³ | {comp / 2**20:.2f} MiB | {comp / crop_bytes:.2f}× | {dec:.2f}× |")


if __name__ == "__main__":
    main()
