"""Integration tests of tools/pretrain.py, run as a subprocess as a user would.

Small on purpose (tiny preset, 64^3 crops, 2 studies x 2 crops per step, a few steps): they
check behaviour (resume bit-exactness, 2-process equivalence, NaN skips, config errors), not
learning.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "tools" / "pretrain.py"
SMALL = [
    "--set", "data.batch_size=2", "--set", "data.num_workers=0", "--set", "data.crop.num_crops=2",
    "--set", "optim.warmup_steps=1", "--set", "run.eval_crops=1", "--set", "run.tensorboard=false",
    "--set", "data.max_studies=null",  # the demo default trains on 4 studies; these use the split
]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               T3D_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    return env


def _run(args: list[str], tmp_path: Path, timeout: float = 420, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PRETRAIN), *args], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout, **kw)


@pytest.fixture(scope="module")
def store(phantom_store) -> Path:
    """A small prepared phantom store shared by this module's tests."""
    return phantom_store(10)


def pretrain_demo_defaults() -> dict:
    from t3d_train.demo import DEMO_DEFAULTS

    return DEMO_DEFAULTS


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()]


def test_config_errors_are_one_clear_line(tmp_path):
    res = _run(["--config", "tools/configs/pretrain/t3d-base.yaml", "--set", "optim.lrr=1"], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: tools/configs/pretrain/t3d-base.yaml: field 'optim.lrr': unknown key "
        "(check the spelling; see the preset files for valid keys)"]
    res = _run(["--config", "tools/configs/pretrain/t3d-base.yaml", "--set", "data.crop.crop_size=[80,96,96]",
                "--set", "model.vision.crop_size=[80,96,96]"], tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()  # one line per bad field: the data's and the model's
    assert len(lines) == 2 and "Traceback" not in res.stderr
    assert all("must be a multiple of 32" in x and "got 80 in dim 0" in x for x in lines)
    # the data's crop size must be the model's (the preprocessing contract)
    res = _run(["--set", "data.crop.crop_size=[32,32,32]"], tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert ("data.crop.crop_size [32, 32, 32] differs from the model's crop size "
            "model.vision.crop_size [64, 64, 64]") in res.stderr
    res = _run(["--set", "data.store=/nonexistent/store"], tmp_path)
    assert res.returncode == 2 and "not a prepared store" in res.stderr and "Traceback" not in res.stderr


def test_resume_after_sigkill_is_bit_exact(store, tmp_path):
    common = [*SMALL, "--set", f"data.store={store}", "--set", "optim.max_steps=5",
              "--set", "run.checkpoint_every=4", "--set", "run.eval_split=null"]
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref = _run([*common, "--set", f"run.output_dir={ref_dir}"], tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "T3D pre-training: 5 steps" in ref.stdout
    for key in ("loss", "tcl_loss", "tir_loss", "align_loss"):
        assert all(map(lambda r: r[key] == r[key], _log(ref_dir)))  # finite, logged per term
    assert (ref_dir / "loss_curve.png").stat().st_size > 1000

    # Same run, killed with SIGKILL right after the step-4 checkpoint (2nd epoch, mid-epoch) lands.
    proc = subprocess.Popen([sys.executable, str(PRETRAIN), *common, "--set", f"run.output_dir={cut_dir}"],
                            cwd=ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = cut_dir / "checkpoints" / "step-00000004" / "COMPLETE"
    deadline = time.time() + 400
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run never wrote its step-4 checkpoint"
    state = json.loads((marker.parent / "trainer_state.json").read_text(encoding="utf-8"))["state"]
    assert state["epoch"] >= 1 and state["batch_in_epoch"] != 0, f"want a mid-epoch checkpoint after an epoch boundary: {state}"
    assert not (cut_dir / "model").exists(), "killed too late: the run had already finished"

    res = _run([*common, "--set", f"run.output_dir={cut_dir}", "--resume", "latest"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    a = load_file(ref_dir / "model" / "model.safetensors")
    b = load_file(cut_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), "resumed weights differ from the uninterrupted run"
    losses = {r["step"]: r["loss"] for r in _log(cut_dir)}
    assert [losses[5]] == [r["loss"] for r in _log(ref_dir)][4:]


def test_sigterm_saves_and_exits_cleanly(store, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(PRETRAIN), *SMALL, "--set", f"data.store={store}",
         "--set", "optim.max_steps=50", "--set", "run.checkpoint_every=100",
         "--set", f"run.output_dir={run_dir}"],
        cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")
    deadline = time.time() + 300
    while not (run_dir / "log.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saving at step" in err
    last = _log(run_dir)[-1]["step"]
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == [f"step-{last:08d}"]
    assert (ckpts[0] / "COMPLETE").exists() and (ckpts[0] / "model" / "model.safetensors").exists()


def test_nan_steps_are_skipped_then_stop(store, tmp_path):
    common = [*SMALL, "--set", f"data.store={store}", "--set", "run.eval_split=null",
              "--set", "run.checkpoint_every=100"]
    res = _run([*common, "--set", "optim.max_steps=3", "--set", "run.debug_nan_steps=[1]",
                "--set", f"run.output_dir={tmp_path / 'a'}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    log = _log(tmp_path / "a")
    assert [r["skipped"] for r in log] == [False, True, False]
    assert "step 2 skipped: non-finite loss" in res.stderr
    weights = load_file(tmp_path / "a" / "model" / "model.safetensors")
    assert all(v.isfinite().all() for v in weights.values())

    res = _run([*common, "--set", "optim.max_steps=5", "--set", "run.debug_nan_steps=[0,1,2]",
                "--set", "run.max_consecutive_skips=2", "--set", f"run.output_dir={tmp_path / 'b'}"],
               tmp_path)
    assert res.returncode != 0
    assert "2 consecutive steps had non-finite loss" in res.stderr
    assert "Traceback" not in res.stderr
    assert not list((tmp_path / "b").glob("checkpoints/step-*")), "no NaN may reach a checkpoint"


def test_two_processes_match_one(store, tmp_path):
    """2 gloo processes x 2 studies == 1 process x 4 studies: lr, losses and weights, step by step.

    No warmup and 3 optimizer steps, so the learning rate is non-zero and changes every step:
    a schedule stepped num_processes times per optimizer step (accelerate's prepared scheduler)
    gives a different lr from step 2 on and different weights after the run.
    """
    steps = 3
    common = [*SMALL, "--set", f"data.store={store}", "--set", f"optim.max_steps={steps}",
              "--set", "optim.warmup_steps=0", "--set", "run.eval_split=null",
              "--set", "objective.gather_distributed=true", "--set", "run.checkpoint_every=100"]
    one = _run([*common, "--set", "data.batch_size=4", "--set", f"run.output_dir={tmp_path / 'one'}"],
               tmp_path, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    env = _env(tmp_path)
    env["OMP_NUM_THREADS"] = "1"
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "tools" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", "29561",
         str(PRETRAIN), *common, "--set", "data.batch_size=2", "--set", f"run.output_dir={tmp_path / 'two'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    lr = 1e-3  # the demo's head lr (DEMO_DEFAULTS), cosine over 3 steps without warmup
    expected_lr = [lr * 0.5 * (1 + math.cos(math.pi * k / steps)) for k in range(steps)]
    assert [r["lr"] for r in a] == pytest.approx(expected_lr, rel=1e-9)
    assert [r["lr"] for r in b] == pytest.approx(expected_lr, rel=1e-9)
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "tcl_loss", "tir_loss", "align_loss"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (key, ra, rb)
    # Equal weights, as one vector: ||w2 - w1|| / ||w1|| <= 1e-5 (measured: 2.7e-7; a schedule
    # stepped twice per step gives ~1e-3). Not element by element: parameters whose exact
    # gradient is zero (biases right before a BatchNorm or InstanceNorm) get float-noise
    # gradients that AdamW scales to +-lr whatever their size, differently in the two runs.
    wa = load_file(tmp_path / "one" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    diff = math.sqrt(sum(float(((wb[k].double() - t.double()) ** 2).sum()) for k, t in wa.items()))
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in wa.values()))
    worst = max(wa, key=lambda k: float((wb[k].double() - wa[k].double()).norm()))
    assert diff / norm <= 1e-5, (diff / norm, worst)
    # the weights did move (else equal weights would prove nothing): the losses changed
    assert a[-1]["loss"] != pytest.approx(a[0]["loss"], rel=1e-4)


def test_default_demo_runs_a_few_steps(tmp_path):
    """The README's main job (no --config): phantom data built and cached, then pre-training."""
    run_dir = tmp_path / "demo"
    res = _run(["--set", "optim.max_steps=2", "--set", f"run.output_dir={run_dir}"], tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "cache" / "phantom-n96-96x96x96-s0" / "store" / "index.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 2
    assert set(summary["loss_start"]) == {"loss", "tcl_loss", "tir_loss", "align_loss"}
    # chance values of the contrastive terms: 4 studies x 2 crops -> log 7 and log 4
    assert summary["loss_chance"]["tcl_loss"][1] == pytest.approx(math.log(7))
    assert summary["loss_chance"]["align_loss"][1] == pytest.approx(math.log(4))
    assert "chance log(7) = 1.9459" in res.stdout and "chance log(4) = 1.3863" in res.stdout
    # the collapse monitor: the spread of both crop embeddings, per step and in the summary
    for key in ("visual_emb", "text_informed_emb"):
        for stat in ("same_cos", "cross_cos", "std", "std_ratio"):
            assert f"{key}/{stat}" in summary["spread_end"]
            assert all(f"{key}/{stat}" in rec for rec in _log(run_dir))
    assert "visual_emb        spread: same-study cos" in res.stdout
    r = summary["retrieval"]
    # the demo holds out >= 16 studies (96 phantom studies, 20% of the patients in "test")
    assert r["studies"] >= 16 and 0 <= r["v2r_recall@1"] <= 1 and 0 < r["chance_recall@5"] <= 1
    assert "retrieval on" in res.stdout and "chance" in res.stdout
    assert set(r["eval_spread"]) == {"same_cos", "cross_cos", "std", "std_ratio"}
    assert "held-out crops, eval mode: same-study cos" in res.stdout
    # the demo trains on a small subset so the contrastive terms can fall within its budget
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert config["data"]["max_studies"] == pretrain_demo_defaults()["data"]["max_studies"]
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert (run_dir / "loss_curve.png").is_file()
    # the model card names the run's facts: steps, store, command, final losses next to chance
    card = (run_dir / "model" / "README.md").read_text(encoding="utf-8")
    assert "- steps: 2" in card and f"- data: {config['data']['store']}" in card
    assert "optim.max_steps=2" in card and "## Notes" in card
    assert "- report language(s): `en`" in card  # the store's report languages
    end = summary["loss_end"]
    assert f"| tcl_loss | {end['tcl_loss']:.4f} | log(7) = 1.9459 |" in card
    assert f"| align_loss | {end['align_loss']:.4f} | log(4) = 1.3863 |" in card
    assert f"| tir_loss | {end['tir_loss']:.4f} |  |" in card
    (ckpt,) = (run_dir / "checkpoints").glob("step-*")  # the checkpoint's card names its step
    assert "- steps: 2" in (ckpt / "model" / "README.md").read_text(encoding="utf-8")


def test_unreadable_study_is_counted_not_fatal(store, tmp_path):
    import shutil

    bad_store = tmp_path / "store"
    shutil.copytree(store, bad_store)
    index = json.loads((bad_store / "index.json").read_text(encoding="utf-8"))
    victim = next(s for s in index["studies"] if s["split"] == "train")
    for chunk in (bad_store / "studies" / victim["key"] / "image" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"not a blosc chunk")
    common = [*SMALL, "--set", f"data.store={bad_store}", "--set", "optim.max_steps=3",
              "--set", "run.eval_split=null", "--set", "run.checkpoint_every=100"]
    ok = _run([*common, "--set", "run.max_bad_fraction=0.5", "--set", f"run.output_dir={tmp_path / 'a'}"],
              tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert f"study {victim['study_id']} skipped" in ok.stderr
    assert _log(tmp_path / "a")[-1]["step"] == 3
    strict = _run([*common, "--set", "run.max_bad_fraction=0", "--set", f"run.output_dir={tmp_path / 'b'}"],
                  tmp_path)
    assert strict.returncode != 0 and "Traceback" not in strict.stderr
    assert "studies failed to load (> run.max_bad_fraction=0.0)" in strict.stderr


def test_preprocessing_record_travels_from_training_to_evaluation(store, tmp_path):
    """Train on a non-default HU window; evaluation reads it from the checkpoint and uses it."""
    run = tmp_path / "win"
    res = _run([*SMALL, "--set", f"data.store={store}", "--set", "optim.max_steps=1",
                "--set", "run.eval_split=null", "--set", "data.crop.hu_window=[-200,300]",
                "--set", f"run.output_dir={run}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = json.loads((run / "model" / "config.json").read_text(encoding="utf-8"))
    assert saved["preprocessing"]["hu_window"] == [-200.0, 300.0]
    ckpt = next((run / "checkpoints").glob("step-*"))
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["config"]["model"]["preprocessing"]["hu_window"] == [-200.0, 300.0]

    evaluate = [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--checkpoint", str(run / "model"),
                "--store", str(store), "--out", str(tmp_path / "eval"), "--set", "embedding.mode=random",
                "--set", "embedding.num_crops=1", "--set", "max_studies=3", "--set", "twins_per_study=0"]
    ev = subprocess.run(evaluate, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                        encoding="utf-8", errors="replace", timeout=420)
    assert ev.returncode == 0, ev.stderr[-3000:]
    used = json.loads((tmp_path / "eval" / "eval.json").read_text(encoding="utf-8"))["preprocessing"]
    assert used["hu_window"] == [-200.0, 300.0] and used["crop_size"] == [64, 64, 64]
    # an explicit window that disagrees with the record is refused, in one line, unless forced
    bad = subprocess.run([*evaluate, "--set", "model.hu_window=[-1000,1000]"], cwd=ROOT,
                         env=_env(tmp_path), capture_output=True, text=True, encoding="utf-8",
                         errors="replace", timeout=420)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert "model.hu_window=[-1000.0, 1000.0] disagrees with the window the model was pre-trained " \
           "with, [-200.0, 300.0]" in bad.stderr and "model.force_preprocessing=true" in bad.stderr
