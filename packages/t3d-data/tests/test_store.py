import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from t3d_data import (
    ManifestError,
    PrepareAborted,
    StoreError,
    VolumeStore,
    prepare,
    read_mask,
    read_volume,
)


def _assert_store_matches_sources(store: VolumeStore):
    for i, rec in enumerate(store.records):
        src = read_volume(rec.source)
        assert np.array_equal(store.read(i), src.array), rec.study_id
        assert np.allclose(rec.affine, src.affine) and store.shape(i) == src.array.shape
        if rec.has_mask:
            assert np.array_equal(store.read_mask(i), read_mask(rec.mask_source).array)


def test_prepare_and_read(tmp_path, make_dataset):
    manifest = make_dataset(4, reports=["No acute findings.", "Nodule.", "No  acute findings.\n",
                                        "Effusion."])
    summary = prepare(manifest, tmp_path / "store", chunk=16, progress=False)
    assert (summary.prepared, summary.skipped, summary.quarantined) == (4, 0, 0)
    assert summary.bytes_written > 0 and "4 prepared" in str(summary)
    store = VolumeStore(tmp_path / "store")
    assert len(store) == 4 and store.finding_names == ["effusion", "nodule"]
    assert [r.group for r in store.records] == [0, 1, 0, 2]
    rec = store.records[0]
    assert rec.chunks == (16, 16, 16) and rec.has_mask and not store.records[1].has_mask
    assert rec.source_sha256 and rec.report == "No acute findings."
    _assert_store_matches_sources(store)
    box = (slice(3, 35), slice(0, 32), slice(5, 37))
    assert np.array_equal(store.read(1, box), read_volume(store.records[1].source).array[box])
    with pytest.raises(StoreError, match="has no mask"):
        store.read_mask(1)
    # zarr v3 + blosc zstd with shuffle
    meta = json.loads((tmp_path / "store/studies" / rec.key / "image/zarr.json").read_text(encoding="utf-8"))
    assert meta["zarr_format"] == 3
    blosc = [c for c in meta["codecs"][0]["configuration"]["codecs"] if c["name"] == "blosc"] \
        if meta["codecs"][0]["name"] == "sharding_indexed" else [c for c in meta["codecs"] if c["name"] == "blosc"]
    assert blosc[0]["configuration"]["cname"] == "zstd" and blosc[0]["configuration"]["shuffle"] == "shuffle"
    # rerun: everything skipped; metadata changes are picked up without rewriting
    lines = manifest.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].replace('"report": "Nodule."', '"report": "Mass."')
    manifest.write_text("\n".join(lines[:3]) + "\n", encoding="utf-8")  # also drops study 3
    again = prepare(manifest, tmp_path / "store", chunk=16, progress=False)
    assert (again.prepared, again.skipped) == (0, 3)
    store = VolumeStore(tmp_path / "store")
    assert [r.report for r in store.records][1] == "Mass." and len(store) == 3
    assert len(list((tmp_path / "store/studies").iterdir())) == 3


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="run `t3d-data prepare"):
        VolumeStore(tmp_path)


def test_quarantine_and_abort_threshold(tmp_path, make_dataset, caplog):
    manifest = make_dataset(10)
    data = manifest.parent
    p = data / "ct_003.nii"
    p.write_bytes(p.read_bytes()[:-50])  # truncated
    summary = prepare(manifest, tmp_path / "s1", max_bad_fraction=0.1, progress=False)
    assert (summary.prepared, summary.quarantined) == (9, 1)
    assert "quarantined study 'ct_003'" in caplog.text
    (q,) = [json.loads(x) for x in (tmp_path / "s1/quarantine.jsonl").read_text(encoding="utf-8").splitlines()]
    assert q["study_id"] == "ct_003" and "truncated" in q["reason"]
    assert "ct_003" not in {r.study_id for r in VolumeStore(tmp_path / "s1").records}
    # a second bad study passes the 10% threshold -> fails after trying every study, all good
    # studies kept in the index
    (data / "report_7.txt").write_bytes(b"  ")
    lines = manifest.read_text(encoding="utf-8").splitlines()
    lines[7] = lines[7].replace('"report": "Findings:  case 1.\\n\\nImpression: ok"', '"report": "report_7.txt"')
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(PrepareAborted, match="2 of 10 studies are bad") as exc:
        prepare(manifest, tmp_path / "s2", max_bad_fraction=0.1, progress=False)
    assert exc.value.quarantined == 2 and exc.value.prepared == 8
    assert len(VolumeStore(tmp_path / "s2")) == 8
    with pytest.raises(ManifestError):  # manifest errors stop before writing anything
        (data / "bad.jsonl").write_text('{"study_id": "x"}\n', encoding="utf-8")
        prepare(data / "bad.jsonl", tmp_path / "s3", progress=False)
    assert not (tmp_path / "s3").exists()


def test_prepare_resumes_after_sigkill(tmp_path, make_dataset):
    manifest = make_dataset(6)
    out = tmp_path / "store"
    env = {**os.environ, "T3D_DATA_PREPARE_TEST_DELAY": "0.4"}
    code = f"from t3d_data import prepare; prepare({str(manifest)!r}, {str(out)!r}, progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            index = out / "index.json"
            if index.exists() and len(json.loads(index.read_text(encoding="utf-8"))["studies"]) >= 2:
                break
            assert proc.poll() is None, "prepare finished before it could be killed"
            time.sleep(0.05)
        time.sleep(0.2)  # land inside the next study's write
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = json.loads((out / "index.json").read_text(encoding="utf-8"))["studies"]
    assert 2 <= len(done) < 6
    for entry in done:  # everything the index names is complete
        assert (out / "studies" / entry["key"] / "image" / "zarr.json").exists()
    summary = prepare(manifest, out, progress=False)
    assert summary.skipped == len(done) and summary.prepared == 6 - len(done)
    assert not [p for p in (out / "studies").iterdir() if p.name.startswith(".tmp")]
    store = VolumeStore(out)
    assert [r.study_id for r in store.records] == [f"ct_{i:03d}" for i in range(6)]
    _assert_store_matches_sources(store)


def test_fast_chunk_reader_matches_zarr(tmp_path, make_dataset):
    manifest = make_dataset(2, shape=(37, 21, 18))
    prepare(manifest, tmp_path / "store", chunk=8, progress=False)
    store = VolumeStore(tmp_path / "store")
    assert store._fast_layout(0, "image") is not None and store._fast_layout(0, "mask") is not None
    z, zm = store.array(0, "image"), store.array(0, "mask")
    assert np.count_nonzero(zm[...]) < zm.size  # all-zero mask chunks are not written (fill)
    rng = np.random.default_rng(0)
    for _ in range(30):
        box = tuple(slice(int(a), int(a + rng.integers(0, 30))) for a in
                    (rng.integers(-5, s) for s in z.shape))
        box = tuple(slice(max(b.start, 0), b.stop) for b in box)
        assert np.array_equal(store.read(0, box), z[box]), box
        assert np.array_equal(store.read_mask(0, box), zm[box]), box
    assert np.array_equal(store.read(0, (slice(3, 9),)), z[3:9])
    assert np.array_equal(store.read(0, (slice(0, 9, 2),)), z[0:9:2])  # falls back to zarr
