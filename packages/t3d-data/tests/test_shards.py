"""``prepare --shard I/N`` + ``t3d-data index``: concurrent shards into one store give the store
one process gives; the merge refuses missing, unfinished, inconsistent or incomplete shards."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from t3d_data import StoreError, prepare
from t3d_data.cli import main
from t3d_data.shards import Shard, merge_shards, shard_of

CLI = str(Path(sys.executable).parent / "t3d-data")


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes()
            for p in sorted((store / "studies").rglob("*")) if p.is_file()}


def test_assignment_is_a_stable_hash_of_the_study_id():
    for sid in ("ct_000", "ct_001", "ünïcode/id", "x" * 300):
        naive = int(hashlib.sha256(sid.encode("utf-8")).hexdigest()[:16], 16) % 5
        assert shard_of(sid, 5) == naive
    counts = [0] * 4
    for i in range(400):
        counts[shard_of(f"study_{i}", 4)] += 1
    assert min(counts) > 70  # roughly balanced
    assert Shard.parse(" 2/4 ") == Shard(2, 4) and str(Shard(2, 4)) == "2/4"
    assert Shard(2, 4).index_name == "index.shard-2-of-4.json"
    for bad in ("4/4", "1/0", "a/b", "1", "-1/3"):
        with pytest.raises(ValueError, match="--shard must be I/N"):
            Shard.parse(bad)


def test_three_concurrent_shards_then_index_equal_one_prepare(tmp_path, make_dataset):
    manifest = make_dataset(9)
    (manifest.parent / "ct_004.nii").write_bytes(b"truncated")  # quarantined by its shard
    out = tmp_path / "store"
    env = {**os.environ, "T3D_DATA_PREPARE_TEST_DELAY": "0.2"}  # keep the three runs overlapping
    procs = [subprocess.Popen([CLI, "prepare", str(manifest), str(out), "--shard", f"{i}/3",
                               "--chunk", "16", "--max-bad-fraction", "0.5", "--no-progress"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8")
             for i in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr
        assert "when all shards are, run: t3d-data index" in stdout
    assert not (out / "index.json").exists()  # only the merge writes it
    for i in range(3):
        shard = json.loads((out / f"index.shard-{i}-of-3.json").read_text(encoding="utf-8"))
        ids = [s["study_id"] for s in shard["studies"]] + [q["study_id"] for q in shard["quarantined"]]
        assert shard["complete"] and all(shard_of(sid, 3) == i for sid in ids)
        assert sorted(ids) == sorted(sid for _, sid in shard["assigned"])
    assert main(["index", str(out)]) == 2  # 1 of 9 bad: over the default 5 %, as prepare
    assert main(["index", str(out), "--max-bad-fraction", "0.2"]) == 0
    ref = tmp_path / "ref"
    prepare(manifest, ref, chunk=16, max_bad_fraction=0.5, progress=False)
    for name in ("index.json", "quarantine.jsonl"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert _files(out) == _files(ref)


def test_index_refuses_what_does_not_cover_the_manifest(tmp_path, make_dataset, capsys):
    manifest = make_dataset(6)
    out = tmp_path / "store"
    with pytest.raises(StoreError, match="no shard indexes"):
        prepare(manifest, out, shard="0/2", progress=False, chunk=16)
        (out / "index.shard-0-of-2.json").rename(out / "keep.json")
        merge_shards(out)
    (out / "keep.json").rename(out / "index.shard-0-of-2.json")
    with pytest.raises(StoreError, match=r"1 of 2 shards have not run .*shard 1/2"):
        merge_shards(out)
    assert main(["index", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    first = prepare(manifest, out, shard="1/2", progress=False, chunk=16)
    again = prepare(manifest, out, shard="1/2", progress=False, chunk=16)  # resumes: nothing to do
    assert again.skipped == first.prepared > 0 and again.prepared == 0
    summary = merge_shards(out)
    assert (summary.shards, summary.studies, summary.total) == (2, 6, 6)
    good = (out / "index.json").read_bytes()

    path = out / "index.shard-1-of-2.json"
    shard1 = json.loads(path.read_text(encoding="utf-8"))
    shard0 = json.loads((out / "index.shard-0-of-2.json").read_text(encoding="utf-8"))

    def edited(**changes):
        path.write_text(json.dumps({**shard1, **changes}), encoding="utf-8")

    edited(complete=False)  # a shard still running (or killed)
    with pytest.raises(StoreError, match="shard 1/2 did not finish"):
        merge_shards(out)
    edited(studies=shard1["studies"] + shard0["studies"][:1])  # a study in two shards
    with pytest.raises(StoreError, match="in more than one shard"):
        merge_shards(out)
    edited(studies=shard1["studies"][1:])  # a study lost
    with pytest.raises(StoreError, match=rf"in no shard: '{shard1['studies'][0]['study_id']}'"):
        merge_shards(out)
    edited(manifest_sha256="0" * 64)
    with pytest.raises(StoreError, match="read different manifests"):
        merge_shards(out)
    edited(shard=[0, 2])
    with pytest.raises(StoreError, match="does not match its file name"):
        merge_shards(out)
    edited()
    key = shard1["studies"][0]["key"]
    (out / "studies" / key).rename(out / "studies" / "moved")
    with pytest.raises(StoreError, match=r"have no arrays .*rerun their shards \(1/2\)"):
        merge_shards(out)
    (out / "studies" / "moved").rename(out / "studies" / key)
    lines = manifest.read_text(encoding="utf-8").splitlines()
    manifest.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")  # the manifest changed
    with pytest.raises(StoreError, match="the manifest changed since the shards were prepared"):
        merge_shards(out)
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "index.shard-0-of-3.json").write_text("{}", encoding="utf-8")  # an older run's count
    with pytest.raises(StoreError, match="different shard counts N = 2, 3"):
        merge_shards(out)
    (out / "index.shard-0-of-3.json").unlink()
    assert merge_shards(out).studies == 6 and (out / "index.json").read_bytes() == good


def test_shards_share_a_store_but_refuse_foreign_folders(tmp_path, make_dataset, capsys):
    manifest = make_dataset(4)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a store created by t3d-data prepare"):
        prepare(manifest, mine, shard="0/2", progress=False)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert main(["prepare", str(manifest), str(tmp_path / "s"), "--shard", "2/2"]) == 2
    assert "--shard must be I/N" in capsys.readouterr().err
    assert main(["prepare", str(manifest), str(tmp_path / "s"), "--workers", "0"]) == 2
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err
