"""Fault injection for checkpoints and resume: the project's own record of these cases.

Each test states a fault and asserts the exact outcome: a checkpoint write killed half-way
(simulated by the partial ``.tmp-*`` folder it leaves), the newest checkpoint's
``trainer_state.json`` truncated, nothing to resume from, steps logged after the checkpoint by
a killed run. Most use fake checkpoint folders (``t3d_train.checkpoint`` directly);
one tiny real run, resumed once (1 step each, ~45 s of CPU time per process), checks the whole
path through ``tools/pretrain.py``. SIGKILL after a checkpoint then ``--resume latest`` giving
bit-identical weights is tests/test_pretrain.py::test_resume_after_sigkill_is_bit_exact.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from t3d_train import checkpoint as ckpt
from t3d_train.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "tools" / "pretrain.py"

SMALL = [
    "--set", "data.batch_size=2", "--set", "data.num_workers=0", "--set", "data.crop.num_crops=2",
    "--set", "optim.warmup_steps=1", "--set", "run.eval_crops=1", "--set", "run.tensorboard=false",
    "--set", "data.max_studies=null", "--set", "run.eval_split=null",
    "--set", "model.vision.depths=[1,1,1,1]",  # one Swin block per stage: ~30 % less CPU
]


def _env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                T3D_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="2")


def _run(args: list[str], tmp_path: Path, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PRETRAIN), *args], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=timeout)


def _fake_checkpoint(root: Path, step: int, name: str | None = None) -> Path:
    folder = root / (name or f"step-{step:08d}")
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(
        json.dumps({"step": step, "state": {"step": step}, "config": {}}), encoding="utf-8")
    (folder / "COMPLETE").write_text("ok\n", encoding="utf-8")
    return folder


def _truncate(path: Path, keep: int = 20) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_truncated_newest_state_is_skipped_with_a_warning(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    good = _fake_checkpoint(root, 4)
    bad = _fake_checkpoint(root, 8)
    _truncate(bad / "trainer_state.json")
    with caplog.at_level(logging.WARNING, logger="t3d.checkpoint"):
        assert ckpt.resolve_resume("latest", root) == good
    why = "unreadable trainer state (Expecting value: line 1 column 21 (char 20))"
    assert [r.getMessage() for r in caplog.records] == [
        f"checkpoint {bad} skipped: {bad / 'trainer_state.json'}: {why}"]
    # named explicitly, the same checkpoint is one clear error naming the file and the fix
    with pytest.raises(ConfigError) as err:
        ckpt.resolve_resume(str(bad), root)
    assert str(err.value) == (f"--resume {bad}: {bad / 'trainer_state.json'}: {why}; use "
                              f"--resume latest or another step-* folder under {root}")
    # a state without its step is as unreadable as a truncated one
    (good / "trainer_state.json").write_text('{"state": {}}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"no complete checkpoint under .*; start without"):
        ckpt.resolve_resume("latest", root)


def test_nothing_to_resume_from_is_a_config_error(tmp_path):
    for root in (tmp_path / "missing", tmp_path):
        with pytest.raises(ConfigError) as err:
            ckpt.resolve_resume("latest", root)
        assert str(err.value) == (f"--resume latest: no complete checkpoint under {root}; start "
                                  "without --resume, or point run.output_dir at the run to continue")
    with pytest.raises(ConfigError, match="not a complete checkpoint \\(no COMPLETE marker\\)"):
        ckpt.resolve_resume(str(tmp_path), tmp_path)


def test_killed_write_leftovers_never_count_and_are_cleared_before_reuse(tmp_path):
    root = tmp_path / "checkpoints"
    done = _fake_checkpoint(root, 4)
    # a write killed between its COMPLETE marker and the rename: complete-looking, still a temp
    _fake_checkpoint(root, 9, name=".tmp-00000009")
    # a write killed half-way through the weights, at the step about to be written again
    partial = root / ".tmp-00000006"
    (partial / "model").mkdir(parents=True)
    (partial / "model" / ".model.safetensors.123-ab.tmp").write_bytes(b"\0" * 64)
    (partial / "optimizer.bin").write_bytes(b"half")
    assert ckpt.resolve_resume("latest", root) == done

    ckpt.clear_stale(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]
    tmp = ckpt.tmp_folder(root, 6)
    tmp.mkdir()
    (tmp / "optimizer.bin").write_bytes(b"new")
    final = ckpt.finalize(tmp, root, 6, {"step": 6, "state": {}}, keep_last=1)
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*")) == [
        "COMPLETE", "optimizer.bin", "trainer_state.json"]
    assert (final / "optimizer.bin").read_bytes() == b"new"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000006"]  # keep_last=1 pruned 4


def test_finalize_fsyncs_every_file_and_folder_before_the_rename(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    tmp = ckpt.tmp_folder(root, 3)
    (tmp / "model").mkdir(parents=True)
    (tmp / "model" / "model.safetensors").write_bytes(b"w")
    (tmp / "optimizer.bin").write_bytes(b"o")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = ckpt.finalize(tmp, root, 3, {"step": 3, "state": {}}, keep_last=2)
    rename = events.index(("rename", str(tmp)))
    synced_before = {Path(p) for kind, p in events[:rename] if kind == "fsync"}
    expected = {tmp, tmp / "model"} | {tmp / n for n in ("model/model.safetensors", "optimizer.bin",
                                   "trainer_state.json", "COMPLETE")}
    assert expected <= synced_before, expected - synced_before
    assert ("fsync", str(root)) in events[rename:], "the rename itself must reach the disk"
    assert sorted(p.name for p in final.iterdir()) == [
        "COMPLETE", "model", "optimizer.bin", "trainer_state.json"]


def test_trim_log_keeps_each_step_once(tmp_path):
    log = tmp_path / "log.jsonl"
    assert ckpt.trim_log(log, 3) == 0 and not log.exists()
    records = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4, 5)]
    records.insert(2, {"step": 2, "loss": 20.0})  # a step logged twice by an older resume
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "lo',
                   encoding="utf-8")  # a line torn by the kill
    assert ckpt.trim_log(log, 3) == 3
    assert [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 20.0}, {"step": 3, "loss": 3.0}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]  # no temp file left
    assert ckpt.trim_log(log, 0) == 0 and log.read_text(encoding="utf-8") == ""


def test_resume_latest_with_nothing_to_resume_fails_fast_in_one_line(tmp_path):
    """The README's demo command with --resume and no run yet: one line, status 2, and nothing
    built first (the demo's phantom store is not generated)."""
    run_dir = tmp_path / "run"
    res = _run(["--resume", "latest", "--set", f"run.output_dir={run_dir}"], tmp_path, timeout=240)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.splitlines() == [
        f"error: --resume latest: no complete checkpoint under {run_dir / 'checkpoints'}; start "
        "without --resume, or point run.output_dir at the run to continue"]
    assert not (tmp_path / "cache").exists() and not run_dir.exists()


@pytest.fixture(scope="module")
def store(phantom_store) -> Path:
    """5 training studies of 64^3 (one held out): the smallest store a 2-study batch runs on."""
    return phantom_store(6, shape=(64, 64, 64))


def test_real_resume_skips_a_corrupt_newest_checkpoint_and_logs_each_step_once(store, tmp_path):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    common = [*SMALL, "--set", f"data.store={store}", "--set", f"run.output_dir={run_dir}",
              "--set", "run.checkpoint_every=1", "--set", "run.keep_last=3"]
    # leftovers of a checkpoint write killed at the step this run is about to save
    (root / ".tmp-00000001" / "model").mkdir(parents=True)
    (root / ".tmp-00000001" / "model" / ".model.safetensors.99-ab.tmp").write_bytes(b"\0" * 64)
    (root / ".tmp-00000001" / "stale-optimizer.bin").write_bytes(b"partial")

    first = _run([*common, "--set", "optim.max_steps=1"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    step1 = root / "step-00000001"
    files = sorted(p.relative_to(step1).as_posix() for p in step1.rglob("*") if p.is_file())
    assert not [f for f in files if "stale" in f or "/." in f or f.startswith(".")], files
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]
    # the weights are stored once: model/ (save_pretrained) + the objective's temperatures
    assert "model/model.safetensors" in files and "objective.safetensors" in files
    assert "model.safetensors" not in files
    from safetensors import safe_open

    holders = []
    for name in (f for f in files if f.endswith(".safetensors")):
        with safe_open(str(step1 / name), framework="pt") as f:
            if any(".swinViT." in k for k in f.keys()):  # noqa: SIM118
                holders.append(name)
    assert holders == ["model/model.safetensors"]
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {f: oct(stat.S_IMODE((step1 / f).stat().st_mode)) for f in files}
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes  # not safetensors' own 0600
    size = sum((step1 / f).stat().st_size for f in files)
    weights = (step1 / "model" / "model.safetensors").stat().st_size
    assert size < 3.3 * weights, (size, weights)  # weights + AdamW's two moments, once each

    # the run is killed after logging step 2, while writing the step-2 checkpoint, whose state
    # file ends up truncated
    with (run_dir / "log.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": 2, "loss": 999.0}) + "\n" + '{"step": 3, "lo')
    bad = _fake_checkpoint(root, 2)
    _truncate(bad / "trainer_state.json")

    second = _run([*common, "--set", "optim.max_steps=2", "--resume", "latest"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (f"checkpoint {bad} skipped: {bad / 'trainer_state.json'}: unreadable trainer state"
            in second.stderr)
    assert f"resumed from {step1} at step 1" in second.stderr
    assert _steps(run_dir) == [1, 2]
    assert json.loads((run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()[1])[
        "loss"] != 999.0
    assert ckpt.read_state(bad)["step"] == 2  # rewritten, complete
    # the benchmark still finds the trained temperatures in the new layout
    from t3d_train.benchmark import trained_temperatures

    assert set(trained_temperatures(run_dir)) == {"tcl", "align"}
