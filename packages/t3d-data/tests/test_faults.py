"""Fault injection for ingestion: the project's record of what bad input and hostile folders do.

Each test asserts the exact outcome (exit status, the message naming the file, good studies kept,
nothing outside the output folder touched). docs/reliability.md lists these as guarantees.
"""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from t3d_data import (
    DataConfig,
    ManifestError,
    PrepareAborted,
    StoreError,
    VolumeReadError,
    VolumeStore,
    build_crop_loader,
    load_manifest,
    prepare,
    read_volume,
)
from t3d_data.cli import main


def _tree(root: Path, skip: Path | None = None) -> dict[str, bytes | None]:
    """Every path under ``root`` (except under ``skip``) -> file bytes (None for folders)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() else None
    return out


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(x) for x in manifest.read_text(encoding="utf-8").splitlines() if x.strip()]


def _write_rows(manifest: Path, rows: list[dict]) -> None:
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _header_only_gz(path: Path, shape, dtype) -> Path:
    """A .nii.gz holding only a header (352 bytes). Shapes whose data size is a multiple of
    2**32 make the gzip length trailer (352) agree with the header mod 2**32: the cheap trailer
    check passes, as it does for a forged trailer."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["vox_offset"] = 352
    assert int(np.prod(shape)) * np.dtype(dtype).itemsize % 2**32 == 0
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4, mtime=0))
    return path


_MEASURE = """
import inspect, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # protects the machine on a regression
from t3d_data.readers import read_volume
kw = {}
if sys.argv[2] != "default" and "max_bytes" in inspect.signature(read_volume).parameters:
    kw["max_bytes"] = int(sys.argv[2])
try:
    read_volume(sys.argv[1], max_voxels=2**31, **kw)
    print("NO ERROR")
except Exception as err:
    print(type(err).__name__ + ": " + str(err).replace("\\n", "<NEWLINE>"))
# this process's own peak (ru_maxrss would include the parent's RSS inherited across exec)
with open("/proc/self/status") as f:
    print("RSS_MB", next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024)
"""


def _read_in_subprocess(path: Path, max_bytes: int | str = "default") -> tuple[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(max_bytes)],
                         capture_output=True, encoding="utf-8", timeout=120, env=env)
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 0 and len(lines) >= 2, res.stdout + res.stderr[-2000:]
    return lines[-2], float(lines[-1].split()[1])


def test_forged_gzip_trailer_fails_with_bounded_memory(tmp_path):
    # 1024^3 float32 = 2**32 bytes, so the true trailer of a header-only file (352) already
    # "matches" mod 2**32: the size check passes and the old reader allocated 4.3 GB.
    forged = _header_only_gz(tmp_path / "forged.nii.gz", (1024, 1024, 1024), np.float32)
    assert forged.stat().st_size < 200
    message, rss_mb = _read_in_subprocess(forged, max_bytes=2**36)  # past the budget check
    assert message.startswith("VolumeReadError: "), message
    assert str(forged) in message and "<NEWLINE>" not in message
    # diagnosed from the stream (352 bytes, not 4 GiB), not by running out of memory
    assert "truncated" in message and "ends after 352" in message and "Memory" not in message
    assert rss_mb < 300, f"peak RSS {rss_mb:.0f} MB"


def test_lying_header_is_refused_by_the_byte_budget(tmp_path, write_nifti, body_volume):
    # float64 under max_voxels = 2**31 voxels: 12.9 GB; refused before any allocation.
    lying = _header_only_gz(tmp_path / "lying.nii.gz", (1024, 1024, 1536), np.float64)
    message, rss_mb = _read_in_subprocess(lying)
    assert message.startswith("VolumeReadError: ") and str(lying) in message, message
    assert "max_bytes" in message and "--max-bytes" in message and rss_mb < 300
    with pytest.raises(VolumeReadError, match="max_bytes"):  # the default budget refuses it too
        read_volume(lying)
    # the budget is dtype-aware: same shape, int16 fits where float64 does not
    vol = body_volume((20, 18, 16))
    small = write_nifti(tmp_path / "i16.nii.gz", vol)
    big = write_nifti(tmp_path / "f64.nii.gz", vol.astype(np.float64))
    budget = vol.size * 4
    assert np.array_equal(read_volume(small, max_bytes=budget).array, vol)
    with pytest.raises(VolumeReadError, match=r"f64\.nii\.gz.*float64.*max_bytes"):
        read_volume(big, max_bytes=budget)
    for dtype in (np.float64, np.float32, np.uint16, ">i2"):  # streamed .gz reader: same values
        src = write_nifti(tmp_path / "src.nii.gz", (vol + 1200).astype(dtype))
        assert np.array_equal(read_volume(src).array, vol + 1200), dtype


def test_patient_leak_is_rejected_by_validate_and_prepare(tmp_path, make_dataset, capsys):
    manifest = make_dataset(4)  # patients p0 (ct_000, ct_001), p1 (ct_002, ct_003)
    rows = _rows(manifest)
    for row, split in zip(rows, ["train", "test", "val", "train"], strict=True):
        row["split"] = split
    _write_rows(manifest, rows)
    with pytest.raises(ManifestError) as exc:
        load_manifest(manifest)
    tail = ("; splits must never share a patient: put all of its studies in one split "
            "(field 'split')")
    assert exc.value.errors == [
        "studies.jsonl: patient 'p0' is in more than one split: 'train' (line 1), 'test' (line 2)"
        + tail,
        "studies.jsonl: patient 'p1' is in more than one split: 'val' (line 3), 'train' (line 4)"
        + tail,
    ]
    out = tmp_path / "store"
    for argv in (["validate", str(manifest)], ["prepare", str(manifest), str(out)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert err[0] == "t3d-data: error: 2 error(s) in manifest:"
        assert err[1:] == [f"t3d-data: error: {e}" for e in exc.value.errors]
    assert not out.exists()  # nothing written


def test_small_mixed_manifest_keeps_every_good_study(tmp_path, make_dataset, capsys):
    manifest = make_dataset(6)
    data = manifest.parent
    trunc = data / "ct_001.nii"
    trunc.write_bytes(trunc.read_bytes()[:-50])
    (data / "ct_004.nii").unlink()
    out = tmp_path / "store"
    # default 5% allows no bad study in 6: every study is still tried before deciding
    with pytest.raises(PrepareAborted, match="2 of 6 studies are bad") as exc:
        prepare(manifest, out, progress=False)
    assert (exc.value.prepared, exc.value.quarantined, exc.value.total) == (4, 2, 6)
    assert "ct_001" in str(exc.value) and "ct_004" in str(exc.value)
    assert str(out / "quarantine.jsonl") in str(exc.value)
    assert [r.study_id for r in VolumeStore(out).records] == ["ct_000", "ct_002", "ct_003",
                                                             "ct_005"]
    q = [json.loads(x) for x in (out / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["study_id"] for x in q] == ["ct_001", "ct_004"]
    assert str(trunc) in q[0]["reason"] and "truncated" in q[0]["reason"]
    assert str(data / "ct_004.nii") in q[1]["reason"] and "not found" in q[1]["reason"]
    # the CLI: each bad study on its own stderr line naming its file, then the verdict; exit 2
    res = subprocess.run([sys.executable, "-m", "t3d_data.cli", "prepare", str(manifest), str(out),
                          "--no-progress"], capture_output=True, encoding="utf-8", timeout=120)
    assert res.returncode == 2, res.stderr
    err = res.stderr.splitlines()
    assert len(err) == 3 and str(trunc) in err[0] and str(data / "ct_004.nii") in err[1], err
    assert err[2].startswith("t3d-data: error: prepare aborted: 2 of 6 studies are bad")
    # within the threshold: exit 0 and the same four studies
    assert main(["prepare", str(manifest), str(out), "--no-progress",
                 "--max-bad-fraction", "0.34"]) == 0
    assert "6 studies: 0 prepared, 4 skipped (unchanged), 2 quarantined" in capsys.readouterr().out
    assert len(VolumeStore(out)) == 4


def test_all_bad_manifest_is_an_error(tmp_path, make_dataset, capsys):
    manifest = make_dataset(2)
    for p in manifest.parent.glob("ct_*.nii"):
        p.unlink()
    out = tmp_path / "store"
    with pytest.raises(PrepareAborted, match=r"has 0 usable studies") as exc:
        prepare(manifest, out, max_bad_fraction=1.0, progress=False)
    assert str(out) in str(exc.value) and exc.value.quarantined == 2
    assert main(["prepare", str(manifest), str(out), "--max-bad-fraction", "1",
                 "--no-progress"]) == 2
    assert "has 0 usable studies" in capsys.readouterr().err


def test_loader_names_an_empty_split(tmp_path, make_dataset):
    from t3d_data import CropDataset, VolumeDataset

    manifest = make_dataset(2)  # no split assigned
    prepare(manifest, tmp_path / "store", progress=False)
    store = tmp_path / "store"
    msg = f"store {store} has 0 studies in split 'train'"
    with pytest.raises(StoreError, match="^" + msg.replace("'", ".")) as exc:
        build_crop_loader(DataConfig(store=store, split="train", num_workers=0))
    assert "(studies per split: no split: 2)" in str(exc.value)  # says which splits the store does have
    for cls in (CropDataset, VolumeDataset):
        with pytest.raises(StoreError, match=msg.replace("'", ".")):
            cls(store, split="train", require_studies=True)
        assert len(cls(store, split="train")) == 0  # tolerated unless required (tools check len)


def test_foreign_files_in_the_output_folder_are_untouched(tmp_path, make_dataset, capsys):
    manifest = make_dataset(3)
    # 1. a folder prepare did not create: refused, nothing touched
    foreign = tmp_path / "results"
    (foreign / "studies" / "my_important_results").mkdir(parents=True)
    (foreign / "studies" / "my_important_results" / "table.csv").write_text("a,b\n")
    (foreign / "studies" / ".tmp-keepme").mkdir()
    (foreign / "studies" / ".tmp-keepme" / "x.txt").write_text("keep")
    before = _tree(tmp_path)
    with pytest.raises(StoreError, match="not a store created by t3d-data prepare") as exc:
        prepare(manifest, foreign, progress=False)
    assert str(foreign) in str(exc.value) and "t3d-store.json" in str(exc.value)
    assert main(["prepare", str(manifest), str(foreign), "--no-progress"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert _tree(tmp_path) == before
    # 2. its own store: foreign entries inside are left alone, only its own leftovers go
    out = tmp_path / "store"
    prepare(manifest, out, progress=False)
    assert json.loads((out / "t3d-store.json").read_text(encoding="utf-8"))["format"] == "t3d-store"
    keys = [r.key for r in VolumeStore(out).records]
    (out / "studies" / "my_important_results").mkdir()
    (out / "studies" / "my_important_results" / "table.csv").write_text("a,b\n")
    (out / "studies" / ".tmp-keepme").mkdir()
    (out / "studies" / "notes.txt").write_text("mine")
    (out / "README.txt").write_text("mine")
    (out / "studies" / f".tmp-{keys[0]}.999999").mkdir()  # a killed run's temp folder
    (out / ".tmp-index.json.999999").write_text("{")  # a killed run's temp index
    _write_rows(manifest, _rows(manifest)[:2])  # drop ct_002: its folder is ours to remove
    outside = _tree(tmp_path, skip=out)
    summary = prepare(manifest, out, progress=False)
    assert (summary.skipped, summary.prepared) == (2, 0)
    assert sorted(p.name for p in (out / "studies").iterdir()) == sorted(
        [*keys[:2], "my_important_results", ".tmp-keepme", "notes.txt"])
    assert (out / "studies" / "my_important_results" / "table.csv").read_text(encoding="utf-8") == "a,b\n"
    assert (out / "README.txt").exists() and not (out / ".tmp-index.json.999999").exists()
    assert _tree(tmp_path, skip=out) == outside
    # a store written before markers existed (valid index.json) is adopted
    (out / "t3d-store.json").unlink()
    assert prepare(manifest, out, progress=False).skipped == 2
    assert (out / "t3d-store.json").is_file() and (out / "README.txt").exists()
    # ... and so is what an older version's killed first run left (only prepare's own names)
    killed = tmp_path / "killed"
    (killed / "studies" / f".tmp-{keys[0]}.4242").mkdir(parents=True)
    assert prepare(manifest, killed, progress=False).prepared == 2
    assert sorted(p.name for p in (killed / "studies").iterdir()) == sorted(keys[:2])
    # 3. an empty existing folder is fine (and gets the marker); a file is refused
    (tmp_path / "afile").write_text("x")
    assert main(["phantom", str(tmp_path / "afile"), "--studies", "1"]) == 2
    assert capsys.readouterr().err.startswith("t3d-data: error: ")
    assert main(["prepare", str(manifest), str(tmp_path / "afile"), "--no-progress"]) == 2
    assert "afile: exists and is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    prepare(manifest, tmp_path / "empty", progress=False)
    assert (tmp_path / "empty" / "t3d-store.json").is_file()


def test_hostile_study_ids_stay_inside_the_store(tmp_path, make_dataset):
    manifest = make_dataset(5)
    rows = _rows(manifest)
    hostile = ["../../../outside/ESCAPED", "/abs/ESCAPED", "a\\..\\..\\ESCAPED", "..", "x" * 300]
    for row, sid in zip(rows, hostile, strict=True):
        row["study_id"] = sid
        row["patient_id"] = sid[:20] + "p"
    _write_rows(manifest, rows)
    outside = _tree(tmp_path, skip=tmp_path / "deep")
    out = tmp_path / "deep" / "store"
    prepare(manifest, out, progress=False)
    store = VolumeStore(out)
    assert [r.study_id for r in store.records] == hostile
    for rec in store.records:
        folder = (out / "studies" / rec.key).resolve()
        assert folder.parent == (out / "studies").resolve() and folder.is_dir()
        assert len(rec.key) < 120
    assert _tree(tmp_path, skip=tmp_path / "deep") == outside
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["store"]


def test_manifest_diagnostics(tmp_path, make_dataset, capsys):
    manifest = make_dataset(3)
    data = manifest.parent
    # invalid UTF-8 inside the manifest itself (an inline report) is replaced and counted
    raw = manifest.read_bytes().splitlines(keepends=True)
    raw[0] = raw[0].replace(b"Findings:", b"Findings \xff\xfe:")
    (data / "empty.txt").write_text(" \n\t\n", encoding="utf-8")
    raw[1] = raw[1].replace(b'"Findings:  case 1.\\n\\nImpression: ok"', b'"empty.txt"')
    manifest.write_bytes(b"".join(raw))
    prepare(manifest, tmp_path / "store", max_bad_fraction=0.5, progress=False)
    store = VolumeStore(tmp_path / "store")
    rec = store.records[0]
    assert rec.study_id == "ct_000" and rec.replaced_bytes == 2 and "\ufffd" in rec.report
    assert store.records[1].replaced_bytes == 0
    # an empty report *file* is quarantined naming the file
    (q,) = [json.loads(x) for x in
            (tmp_path / "store/quarantine.jsonl").read_text(encoding="utf-8").splitlines()]
    assert q["study_id"] == "ct_001" and str(data / "empty.txt") in q["reason"]
    assert "empty" in q["reason"]
    # many manifest errors: one per stderr line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"study_id": "a"}\n{"study_id": "b", "patient_id": "p", "image": "x.nii", '
                   '"report": "r", "split": "dev"}\nnot json\n', encoding="utf-8")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) >= 5 and all(line.startswith("t3d-data: error: ") for line in err)
    assert any("bad.jsonl line 3: invalid JSON" in line for line in err)
    # a folder given as the manifest: a hint, not "manifest not found"
    (tmp_path / "phantom").mkdir()
    (tmp_path / "phantom" / "manifest.jsonl").write_text("", encoding="utf-8")
    for cmd in (["validate", str(tmp_path / "phantom")],
                ["prepare", str(tmp_path / "phantom"), str(tmp_path / "s")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert err == (f"t3d-data: error: {tmp_path / 'phantom'}: expected a manifest file, got a "
                       f"folder; did you mean {tmp_path / 'phantom' / 'manifest.jsonl'}?\n")


@pytest.mark.parametrize("argv, flag", [
    (["prepare", "m.jsonl", "out", "--chunk", "0"], "--chunk"),
    (["prepare", "m.jsonl", "out", "--max-bad-fraction", "2"], "--max-bad-fraction"),
    (["prepare", "m.jsonl", "out", "--max-voxels", "0"], "--max-voxels"),
    (["prepare", "m.jsonl", "out", "--max-bytes", "-1"], "--max-bytes"),
    (["phantom", "out", "--studies", "0"], "--studies"),
    (["phantom", "out", "--shape", "8", "8", "8"], "--shape"),
    (["demo", "out", "--studies", "-3"], "--studies"),
])
def test_cli_errors_use_the_users_argument_names(tmp_path, argv, flag, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"t3d-data: error: {flag} ") and err.count("\n") == 1, err
    for internal in ("n_studies", "max_bad_fraction", "max_voxels", "max_bytes", "error: chunk"):
        assert internal not in err
    assert not (tmp_path / "out").exists()
