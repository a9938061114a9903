"""Integration tests of the evaluation scripts, run as subprocesses as a user would.

One smoke benchmark (tools/run_benchmark.py --preset smoke: one pre-training step of the T3D arm,
the no-pre-training arm, held-out pretext losses, retrieval/twins/zero-shot, linear probe, a
1-step segmentation fine-tune with Dice and an overlay, bootstrap intervals), its ``--reuse``
rerun, and tools/evaluate.py on the checkpoint it produced. They check that the pipeline runs end
to end and writes what it promises, not that anything is learned.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


def _env(cache: Path) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                T3D_CACHE_DIR=str(cache), OMP_NUM_THREADS="2")


def _run(script: str, args: list[str], cache: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOLS / script), *args], cwd=ROOT, env=_env(cache),
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    out, md = root / "out", root / "results.md"
    md.write_text("# Results\n\nhand-written note that must survive\n", encoding="utf-8")
    res = _run("run_benchmark.py", ["--preset", "smoke", "--out", str(out), "--results-md", str(md)],
               root / "cache")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return {"out": out, "md": md, "cache": root / "cache", "root": root}


@pytest.mark.slow
def test_smoke_benchmark_writes_results(smoke):
    out = smoke["out"]
    agg = json.loads((out / "benchmark.json").read_text(encoding="utf-8"))
    assert set(agg) == {"t3d", "none"}
    for arm in ("t3d", "none"):
        run = json.loads((out / "runs" / f"{arm}-seed0.json").read_text(encoding="utf-8"))
        per = json.loads((out / "runs" / f"{arm}-seed0.per_study.json").read_text(encoding="utf-8"))
        # the aggregate numbers are those of the per-study values written next to them
        for side in ("v2r", "r2v"):
            ranks = np.array(per["retrieval"][f"{side}_rank"])
            for k in (1, 5, 10):
                assert run["retrieval"][f"{side}_recall@{k}"] == pytest.approx(np.mean(ranks <= k))
            assert run["retrieval"][f"{side}_median_rank"] == pytest.approx(np.median(ranks))
        twins = run["twin_accuracy"]
        per_study_twins = _benchmark_module().PRESETS["smoke"]["twins_per_study"]
        assert twins["count"] == sum(twins["counts"].values()) == (
            per_study_twins * run["test_studies"])
        assert "macro" in run["zero_shot_auc"] and "macro" in run["linear_probe_auc"]
        dice = run["dice"]
        classes = ["lungs", "heart", "liver", "spleen", "kidneys"]  # the phantom's tasks
        assert list(dice) == [*classes, "mean"]
        rows = np.array(per["dice"]["dice"], dtype=float)  # null (absent class) -> NaN
        assert rows.shape == (run["seg_test_studies"], len(classes))
        for c, col in zip(classes, rows.T, strict=True):
            if np.isnan(col).all():
                assert dice[c] is None, c
            else:
                assert dice[c] == pytest.approx(np.nanmean(col), abs=1e-6), c
        have = [dice[c] for c in classes if dice[c] is not None]
        assert dice["mean"] == pytest.approx(np.mean(have), abs=1e-6)
        png = Path(run["overlays"][0])
        assert png.suffix == ".png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # aggregated leaves are mean/std pairs
        assert set(agg[arm]["retrieval"]["v2r_recall@1"]) == {"mean", "std"}
    assert (out / "pretrain" / "t3d-seed0" / "model" / "config.json").is_file()
    md = smoke["md"].read_text(encoding="utf-8")
    assert "hand-written note that must survive" in md
    assert "<!-- benchmark:smoke:start -->" in md and "<!-- benchmark:smoke:end -->" in md
    assert "uv run python tools/run_benchmark.py --preset smoke --out" in md
    assert "| metric | t3d | none |" in md and "| linear-probe macro AUC |" in md
    assert "Comparisons, as measured by this run:" in md
    assert "--results-md" not in md
    # held-out pretext losses, per-study values, bootstrap intervals and their table
    for arm in ("t3d", "none"):
        run = json.loads((out / "runs" / f"{arm}-seed0.json").read_text(encoding="utf-8"))
        for name in ("trained", "fixed"):
            pre = run["pretext"][name]
            assert pre["chance"] == {"tcl_loss": math.log(3), "align_loss": math.log(2)}
            assert pre["batches"] >= 1 and pre["crops_per_batch"] == 4
            assert math.isfinite(pre["tcl_loss"]) and math.isfinite(pre["align_loss"])
        assert run["pretext"]["temperature"]["tcl_trained_source"] == (
            "checkpoint" if arm == "t3d" else "initial value")
        per = json.loads((out / "runs" / f"{arm}-seed0.per_study.json").read_text(encoding="utf-8"))
        assert set(per) == {"retrieval", "probe", "dice", "pretext"}
        assert len(per["retrieval"]["v2r_rank"]) == run["test_studies"]
        assert len(per["probe"]["probs"]) == run["test_studies"]
        assert len(per["dice"]["dice"]) == run["seg_test_studies"]
        assert "per_study" not in run
    intervals = json.loads((out / "intervals.json").read_text(encoding="utf-8"))
    assert set(intervals["arms"]) == {"t3d", "none"}
    for arm in ("t3d", "none"):
        for key in ("pretext_trained/tcl_loss", "pretext_fixed/align_loss", "v2r_recall@5",
                    "linear_probe_auc", "dice"):
            row = intervals["arms"][arm][key]
            assert row["low"] <= row["estimate"] + 1e-9 and row["estimate"] <= row["high"] + 1e-9
    assert set(intervals["difference_vs_none"]["t3d"]) >= {"v2r_recall@5", "dice"}
    assert intervals["chance"]["pretext_trained/tcl_loss"] == pytest.approx(math.log(3))
    assert "95% intervals (percentile bootstrap" in md
    assert "| measure | units | chance | t3d | none |" in md
    assert "| held-out TCL loss, trained τ ↓ |" in md and "log 3 = 1.099" in md
    assert "- t3d vs none, v2r R@5:" in md and "paired difference" in md


@pytest.mark.slow
def test_reuse_skips_finished_runs_and_scores(smoke):
    before = (smoke["out"] / "intervals.json").read_text(encoding="utf-8")
    docs = (ROOT / "docs" / "results.md").read_bytes()
    res = _run("run_benchmark.py", ["--preset", "smoke", "--out", str(smoke["out"]), "--reuse"],
               smoke["cache"])
    assert res.returncode == 0, res.stderr[-4000:]
    # the tracked docs are rewritten only with --update-docs; the run folder has the section
    assert (ROOT / "docs" / "results.md").read_bytes() == docs
    assert "docs/results.md untouched; --update-docs writes this section there" in res.stdout
    assert "### Preset `smoke`" in (smoke["out"] / "summary.md").read_text(encoding="utf-8")
    assert "reusing the scores of t3d-seed0" in res.stdout
    assert "reusing the scores of none-seed0" in res.stdout
    assert "[benchmark] pre-training" not in res.stdout
    assert "[benchmark] downstream" not in res.stdout
    assert (smoke["out"] / "intervals.json").read_text(encoding="utf-8") == before


def _benchmark_module():
    """tools/run_benchmark.py's functions (the script, not run as ``__main__``)."""
    return SimpleNamespace(**runpy.run_path(str(TOOLS / "run_benchmark.py"),
                                            run_name="run_benchmark_under_test"))


def test_interval_verdicts_and_recall_chance():
    from t3d_train import benchmark as rb

    a = {"estimate": 0.8, "low": 0.7, "high": 0.9}
    b = {"estimate": 0.6, "low": 0.5, "high": 0.65}
    c = {"estimate": 0.75, "low": 0.6, "high": 0.85}
    assert rb.verdict(a, b, True, 50) == "higher with non-overlapping intervals"
    assert rb.verdict(a, c, True, 50) == "higher, overlapping intervals: not evidence"
    assert rb.verdict(b, a, True, 50) == "NOT higher"
    assert rb.verdict(b, a, False, 50) == "lower with non-overlapping intervals"
    assert rb.verdict(a, b, True, 3).startswith("only 3 test unit(s): no verdict")
    assert rb.chance_verdict({"estimate": 1.5, "low": 1.4, "high": 1.6}, math.log(7), 17) == (
        "below chance (the interval excludes chance)")
    assert rb.chance_verdict({"estimate": 1.9, "low": 1.8, "high": 2.0}, math.log(7), 17) == (
        "below chance, but the interval includes chance: not evidence")
    assert rb.chance_verdict({"estimate": 2.0, "low": 1.9, "high": 2.1}, math.log(7), 17) == (
        "NOT below chance")
    # unique reports: R@k chance is k / n; a shared report raises it
    assert rb.recall_chance(list(range(10)), 5) == pytest.approx(0.5)
    assert rb.recall_chance([0, 0] + list(range(1, 9)), 5) > 0.5
    assert rb.recall_chance([0, 1, 2], 5) == 1.0


def test_evidence_presets_meet_the_issue_sizes():
    from t3d_data.phantom.dataset import patient_plan

    rb = _benchmark_module()
    for name in ("cpu-evidence", "gpu-evidence"):
        p = rb.PRESETS[name]
        splits = [s for _, s in patient_plan(p["studies"], 0)]
        assert splits.count("train") >= 200 and splits.count("test") >= 64, name
        assert {"t3d", "none"} <= set(p["arms"]) and len(p["seeds"]) >= 2
        assert p["seg_fraction"] == 0.1
    cpu = rb.PRESETS["cpu-evidence"]
    assert (cpu["steps"], cpu["batch_size"], cpu["num_crops"], cpu["lr"]) == (60, 4, 2, 1e-3)
    assert cpu["shape"] == [96, 96, 64] and cpu["threads"] == 2


@pytest.mark.slow
def test_evaluate_cli_on_the_smoke_checkpoint(smoke):
    ckpt = smoke["out"] / "pretrain" / "t3d-seed0" / "model"
    store = next(smoke["cache"].glob("bench-phantom-*/store"))
    out = smoke["root"] / "eval"
    res = _run("evaluate.py", ["--checkpoint", str(ckpt), "--store", str(store), "--out", str(out),
                               "--set", "twins_per_study=1", "--set", "embedding.mode=random",
                               "--set", "embedding.num_crops=1"], smoke["cache"])
    assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert {"retrieval", "twin_accuracy", "zero_shot_auc", "studies", "config", "chance"} <= set(
        result)
    chance = result["chance"]["retrieval"]
    from t3d_data import VolumeDataset
    from t3d_eval import chance_retrieval

    test = VolumeDataset(store, split="test")
    reports = [test.store.records[test.indices[i]].report for i in range(len(test))]
    assert result["studies"] == len(reports)
    assert chance == pytest.approx(chance_retrieval(reports))
    # one closing paragraph: each number next to its chance value, the same numbers as the file
    r = result["retrieval"]
    assert f"volume→report R@1 {r['v2r_recall@1']:.3f} (chance {chance['recall@1']:.3f})" in (
        res.stdout)
    assert f"median rank {r['v2r_median_rank']:g} (chance {chance['median_rank']:g})" in res.stdout
    assert "--set model.checkpoint=null" in res.stdout
    assert "embed" in res.stderr  # the tqdm bar
    assert result["config"]["sidecar"].endswith("phantom_findings.jsonl")
    assert result["config"]["tasks"] == "phantom"
    twins = result["twin_accuracy"]
    assert twins["count"] == result["studies"] == sum(twins["counts"].values())
    for attr in twins["counts"]:
        assert f"{attr} {twins[attr]:.3f}" in res.stdout
    assert f"{twins['all']:.3f} of {twins['count']} pairs" in res.stdout
    auc = result["zero_shot_auc"]["macro"]
    assert f"Zero-shot macro AUC {float('nan') if auc is None else auc:.3f} (chance 0.5)" in (
        res.stdout)
    table = (out / "eval.md").read_text(encoding="utf-8")
    assert table.startswith("# eval") and "| retrieval/v2r_recall@1 |" in table


@pytest.mark.parametrize(
    ("script", "args", "needle"),
    [
        ("evaluate.py", ["--store", "/x", "--set", "embedding.mod=sliding"],
         "field 'embedding.mod': unknown key"),
        ("finetune_cls.py", ["--store", "/x", "--set", "features=pixels"], "field 'features'"),
        ("finetune_seg.py", ["--store", "/x", "--fraction", "1.5", "--scratch"],
         "field 'label_fraction'"),
        ("finetune_seg.py", ["--config", "tools/configs/eval/finetune_seg.yaml",
                             "--set", "classes={lungs: [2, 3], heart: [2]}", "--scratch"],
         "label value 2 is in both"),
        ("run_benchmark.py", ["--arms", "t3d,clip"], "unknown arm(s) ['clip']"),
    ],
)
def test_config_errors_are_one_line_exit_2(tmp_path, script, args, needle):
    res = _run(script, args, tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr
    assert needle in lines[0]


def test_config_files_validate():
    from t3d_train.config import load_config
    from t3d_train.eval_config import ClassifyConfig, EvaluateConfig, SegmentationConfig

    for name, model in (("evaluate", EvaluateConfig), ("finetune_cls", ClassifyConfig),
                        ("finetune_seg", SegmentationConfig)):
        cfg = load_config(model, TOOLS / "configs" / "eval" / f"{name}.yaml")
        assert cfg.model.checkpoint is not None


# ---------------------------------------------------------------- summaries, plots, packaging
def test_printed_median_rank_is_the_summary_json_number():
    from t3d_train.trainer import retrieval_line

    retrieval = {"studies": 20, "v2r_recall@1": 0.1, "chance_recall@1": 0.05, "v2r_recall@5": 0.3,
                 "chance_recall@5": 0.25, "v2r_median_rank": 4.5, "chance_median_rank": 10.5}
    line = retrieval_line(retrieval, "val")
    assert "median rank 4.5 (chance 10.5)" in line and "R@1 0.10 (chance 0.05)" in line


def test_loss_plot_draws_the_chance_lines(tmp_path):
    from t3d_train.trainer import plot_losses

    records = [{"step": i, "loss": 3.0 - 0.1 * i, "tcl_loss": 2.0 - 0.05 * i,
                "align_loss": 1.5 - 0.01 * i} for i in range(1, 6)]
    chance = {"tcl_loss": ("log(7)", math.log(7)), "align_loss": ("log(4)", math.log(4))}
    labels = plot_losses(records, tmp_path / "loss_curve.png", chance)
    assert "tcl_loss chance log(7) = 1.946" in labels
    assert "align_loss chance log(4) = 1.386" in labels
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["loss_curve.png"]  # no temp file left


def test_seg_summary_shows_both_arms_or_the_baseline_command(tmp_path):
    from t3d_train import segmentation as seg
    from t3d_train.eval_config import SegmentationConfig

    def results(init, mean):
        return {"dice": {"lungs": mean, "heart": float("nan"), "mean": mean}, "steps": 5,
                "label_fraction": 0.1, "test_studies": 3, "train_studies_used": 1,
                "train_studies_labelled": 8, "final_loss": 0.5, "init": init,
                "config": {"store": "S", "seed": 0}}

    cfg = SegmentationConfig(model={"checkpoint": "RUN/model"}, store="S", out=tmp_path,
                             steps=5, classes={"lungs": [2], "heart": [4]})
    mine = results("t3d", 0.6)
    alone = seg.summary(cfg, mine, seg.baseline_results(cfg, mine))
    assert "T3D-initialised SwinUNETR: mean Dice 0.600" in alone and "heart n/a" in alone
    assert "--checkpoint RUN/model --store S" in alone and "--steps 5 --scratch`" in alone
    (tmp_path / "seg-scratch.json").write_text(json.dumps(results("scratch", 0.45)))
    (tmp_path / "other.json").write_text(json.dumps({**results("scratch", 0.1), "steps": 9}))
    both = seg.summary(cfg, mine, seg.baseline_results(cfg, mine))
    assert "from-scratch arm with the same budget" in both and "seg-scratch.json" in both
    assert "mean Dice 0.450; this run minus that one: +0.150" in both
    assert "lungs 0.600 vs 0.450" in both
    scratch = SegmentationConfig(store="S", scratch=True)
    assert scratch.stem == "seg-scratch"
    argv = ["--store", "S", "--set", "scratch=true", "--set", "max_test=1"]
    assert seg.other_arm_command(scratch, argv) == (
        "python tools/finetune_seg.py --store S --set max_test=1 --checkpoint RUN/model")
    assert seg.other_arm_command(cfg, ["--store", "S"]).endswith("--store S --scratch")


def test_cls_summary_puts_auc_next_to_chance():
    from t3d_train import classification as cls
    from t3d_train.eval_config import ClassifyConfig

    res = {"linear_probe_auc": {"nodule": 0.7, "cyst": float("nan"), "macro": 0.7,
                                "skipped": ["cyst"]}, "train_studies": 8, "test_studies": 4}
    text = cls.summary(ClassifyConfig(store="S", model={"checkpoint": "C"}), res)
    assert "macro AUC 0.700 (chance 0.5) over 1 findings on 4 test studies" in text
    assert "No AUC (one class only): cyst" in text and "model.checkpoint=null" in text
    assert "no-pre-training baseline (random-init" in cls.summary(ClassifyConfig(store="S"), res)


def test_t3d_objectives_declares_numpy():
    """torch warns "Failed to initialize NumPy" where numpy is missing; t3d-objectives pulls it."""
    from importlib.metadata import requires

    assert any(r.split(">")[0].strip() == "numpy" for r in requires("t3d-objectives"))
