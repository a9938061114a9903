"""``prepare --workers N``: the same store as one worker; a dying worker and Ctrl-C keep the
finished studies, stop every worker, and a rerun resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from t3d_data import VolumeStore, prepare
from t3d_data.parallel import run_tasks

CLI = str(Path(sys.executable).parent / "t3d-data")


def _files(store: Path) -> dict[str, bytes]:
    """Every file of the store's study folders, by relative path."""
    return {str(p.relative_to(store)): p.read_bytes()
            for p in sorted((store / "studies").rglob("*")) if p.is_file()}


def test_workers_write_the_same_store_as_one(tmp_path, make_dataset):
    manifest = make_dataset(6)
    (manifest.parent / "ct_003.nii").write_bytes(b"not a nifti")  # quarantined either way
    one = prepare(manifest, tmp_path / "one", chunk=16, max_bad_fraction=0.2, progress=False)
    three = prepare(manifest, tmp_path / "three", chunk=16, max_bad_fraction=0.2, progress=False,
                    workers=3)
    assert (one.prepared, one.quarantined) == (three.prepared, three.quarantined) == (5, 1)
    assert three.workers == 3 and three.peak_rss > 0 and three.cpu_seconds > one.cpu_seconds * 0.5 > 0
    for name in ("index.json", "quarantine.jsonl"):  # same entries, order and report groups
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes()
    files = _files(tmp_path / "one")
    assert len(files) > 10 and files == _files(tmp_path / "three")  # same array bytes
    again = prepare(manifest, tmp_path / "three", chunk=16, max_bad_fraction=0.2, progress=False,
                    workers=2)
    assert (again.prepared, again.skipped, again.quarantined) == (0, 5, 1)


def test_one_worker_runs_in_this_process_in_order():
    outcomes = list(run_tasks(divmod, [(7, 2), (1, 1), (9, 3)], workers=1))
    assert [o.position for o in outcomes] == [0, 1, 2]
    assert outcomes[0].value == (3, 1) and outcomes[2].value == (3, 0)
    with pytest.raises(ZeroDivisionError):  # not bad input: raised, not quarantined
        list(run_tasks(divmod, [(1, 0)], workers=1))
    with pytest.raises(ValueError, match="workers must be >= 1"):
        list(run_tasks(divmod, [], workers=0))


def _descendants(pid: int) -> dict[int, int]:
    """pid -> depth below ``pid``, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text(encoding="utf-8").rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    depth, frontier = {}, {pid: 0}
    while frontier:
        nxt = {}
        for child, parent in parents.items():
            if parent in frontier and child not in depth:
                nxt[child] = frontier[parent] + 1
        depth.update(nxt)
        frontier = nxt
    return depth


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _indexed(out: Path) -> list[dict]:
    try:
        return json.loads((out / "index.json").read_text(encoding="utf-8"))["studies"]
    except (OSError, ValueError):
        return []


def _start(manifest: Path, out: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "T3D_DATA_PREPARE_TEST_DELAY": str(delay)}
    return subprocess.Popen([CLI, "prepare", str(manifest), str(out), "--workers", "2",
                             "--chunk", "16", "--no-progress"], env=env, stderr=subprocess.PIPE,
                            encoding="utf-8")


def _wait_for_more_than(out: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while len(_indexed(out)) <= n:
        assert proc.poll() is None, f"prepare ended first: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "prepare made no progress"
        time.sleep(0.05)


def _assert_complete(out: Path) -> list[dict]:
    done = _indexed(out)
    for entry in done:  # everything the index names is complete
        assert (out / "studies" / entry["key"] / "image" / "zarr.json").is_file()
    return done


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker pids from /proc")
def test_dead_worker_and_ctrl_c_keep_finished_studies_and_resume(tmp_path, make_dataset):
    manifest = make_dataset(6)
    out = tmp_path / "store"
    # 1. a worker is killed (as the OOM killer would): the run stops with one clear line
    proc = _start(manifest, out, delay=1.0)
    try:
        _wait_for_more_than(out, 0, proc)
        workers = [p for p, d in _descendants(proc.pid).items() if d == 2]  # under the forkserver
        assert workers, _descendants(proc.pid)
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2, err
    assert "a worker process died" in err and "rerun to resume" in err, err
    done1 = _assert_complete(out)
    assert 1 <= len(done1) < 6
    # 2. Ctrl-C on the resumed run: exit 130, the workers are gone, finished studies indexed
    proc = _start(manifest, out, delay=1.0)
    try:
        _wait_for_more_than(out, len(done1), proc)
        tree = _descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted (rerun to resume)" in err, err
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in tree if _alive(p)], "worker processes outlived the interrupted run"
    done2 = _assert_complete(out)
    assert len(done1) < len(done2) < 6
    # 3. the rerun finishes; the store equals a one-process prepare
    summary = prepare(manifest, out, chunk=16, progress=False, workers=2)
    assert (summary.skipped, summary.prepared) == (len(done2), 6 - len(done2))
    assert not [p for p in (out / "studies").iterdir() if p.name.startswith(".tmp")]
    prepare(manifest, tmp_path / "ref", chunk=16, progress=False)
    assert (out / "index.json").read_bytes() == (tmp_path / "ref" / "index.json").read_bytes()
    assert _files(out) == _files(tmp_path / "ref")
    assert [r.study_id for r in VolumeStore(out).records] == [f"ct_{i:03d}" for i in range(6)]
