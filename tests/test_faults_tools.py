"""Fault injection for the evaluation tools: hostile study ids and names, early path checks.

Hostile ids (``..``, absolute paths, NUL, backslashes, 300 characters, ``a/../../x``) are fed to
every tool that writes per-study files (tools/finetune_seg.py's overlays); a hostile ``--name``
to every tool that writes results. Nothing may be written outside the output folder, and
distinct ids keep distinct files. A store refuses such ids itself, so the studies are handed to
the tool directly. Wrong ``--store`` / ``--checkpoint`` paths must fail before torch is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"

HOSTILE_IDS = [
    "a/../../../../outside/ESCAPED_overlay",
    "..",
    "/tmp/t3d-absolute-ESCAPED",
    "nul\0byte",
    "back\\..\\..\\slash",
    "x" * 300,
    "x" * 299 + "y",
    "a/../../x",
    "a/b",
    "a_b",
    ".hidden",
]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_hostile_study_ids_write_overlays_only_inside_out(tmp_path, monkeypatch):
    import torch
    from t3d_train import segmentation as seg
    from t3d_train.eval_config import SegmentationConfig

    store = tmp_path / "work" / "store"
    store.mkdir(parents=True)
    (store / "index.json").write_text("{}", encoding="utf-8")
    out = tmp_path / "work" / "a" / "b" / "out"
    gen = torch.Generator().manual_seed(0)

    def studies(store_, split, lut, limit=None, progress=False, hu_window=None,
                intensity="hu_window_linear"):
        label = torch.zeros(1, 8, 8, 8, dtype=torch.long)
        label[:, 2:5, 2:5, 2:6] = 1
        label[:, 5:7, 4:7, 1:4] = 2
        rows = [{"image": torch.rand(1, 8, 8, 8, generator=gen), "label": label, "study_id": sid}
                for sid in HOSTILE_IDS]
        return rows[:limit] if limit else rows

    arch = SimpleNamespace(vision=SimpleNamespace(crop_size=(8, 8, 8), in_channels=1))
    monkeypatch.setattr(seg, "labelled_studies", studies)
    monkeypatch.setattr(seg, "build_network",
                        lambda cfg, k, source=None, in_channels=None: (torch.nn.Conv3d(1, k, 1), arch))
    cfg = SegmentationConfig(scratch=True, store=store, out=out, steps=1, batch_size=1,
                             samples_per_volume=1, overlays=len(HOSTILE_IDS), roi_size=(8, 8, 8),
                             classes={"a": [1], "b": [2]}, sw_batch_size=1)
    before = _files(tmp_path)
    results = seg.segment(cfg)
    new = _files(tmp_path) - before
    assert new, "nothing written"
    outside = [p for p in new if out.resolve() not in p.resolve().parents]
    assert not outside, f"written outside --out: {outside}"
    assert not Path("/tmp/t3d-absolute-ESCAPED.png").exists()
    overlays = [Path(p) for p in results["overlays"]]
    assert len(overlays) == len(HOSTILE_IDS) == len(set(overlays))
    assert {p.parent for p in overlays} == {out / "overlays"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in overlays)
    assert all(len(p.name) < 255 for p in overlays)
    # the per-study values keep the original ids (they are data, not file names)
    per = json.loads((out / "seg-scratch.json").read_text(encoding="utf-8"))
    assert per["test_studies"] == len(HOSTILE_IDS)


_PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    print("EXIT", e.code)
print("HEAVY", sorted(m for m in ("torch", "monai", "transformers") if m in sys.modules))
"""


@pytest.mark.parametrize(("script", "args", "needle"), [
    ("evaluate.py", ["--store", "{tmp}/missing"], "store: {tmp}/missing does not exist"),
    ("evaluate.py", ["--store", "{store}", "--checkpoint", "{tmp}/nock"],
     "model.checkpoint: {tmp}/nock does not exist"),
    ("finetune_cls.py", ["--store", "{tmp}/empty"], "store: {tmp}/empty is not a prepared store"),
    ("finetune_cls.py", ["--store", "{store}", "--checkpoint", "{tmp}/empty"],
     "model.checkpoint: {tmp}/empty has no config.json"),
    ("finetune_seg.py", ["--store", "{tmp}/missing", "--scratch"], "store: {tmp}/missing does"),
    ("finetune_seg.py", ["--store", "{store}", "--checkpoint", "{tmp}/nock"],
     "model.checkpoint: {tmp}/nock does not exist"),
    ("run_benchmark.py", ["--out", "{store}/index.json"], "--out: {store}/index.json is a file"),
    ("run_benchmark.py", ["--results-md", "{tmp}/no/such/dir/results.md"],
     "--results-md: folder {tmp}/no/such/dir does not exist"),
    ("evaluate.py", ["--store", "{store}", "--set", "findings={tmp}/nofile.jsonl"],
     "findings: {tmp}/nofile.jsonl does not exist"),
    ("evaluate.py", ["--store", "{store}", "--out", "{store}/index.json"],
     "out: {store}/index.json is a file"),
    ("evaluate.py", ["--store", "{store}", "--name", "../escape"], "field 'name'"),
    ("finetune_cls.py", ["--store", "{store}", "--name", "/abs/x"], "field 'name'"),
    ("finetune_seg.py", ["--store", "{store}", "--scratch", "--name", "a\\\\b"], "field 'name'"),
    # a store without dataset tasks: the segmentation classes are missing, named with the fix
    ("finetune_seg.py", ["--store", "{store}", "--scratch"],
     "classes: store {store} has no dataset tasks, so segmentation has no seg_classes; name a "
     "provider (--tasks NAME; known: phantom)"),
    ("evaluate.py", ["--store", "{store}", "--tasks", "nosuch"],
     "tasks: no dataset tasks named 'nosuch'; known: phantom"),
    # report generation tools (tools/finetune_report.py, generate_reports.py, report_evidence.py)
    ("finetune_report.py", ["--store", "{tmp}/missing"], "store: {tmp}/missing does not exist"),
    ("finetune_report.py", ["--store", "{store}", "--set", "generator.decoder.tokenizer=null"],
     "needs decoder.tokenizer"),
    ("generate_reports.py", ["--checkpoint", "{tmp}", "--store", "{store}"],
     "checkpoint: {tmp} has no report_config.json"),
    ("report_evidence.py", ["--store", "{store}", "--set", "model.checkpoint=null"],
     "model.checkpoint: the evidence compares a pre-trained encoder"),
])
def test_wrong_paths_and_names_fail_before_heavy_imports(tmp_path, script, args, needle):
    """One line, exit 2, and torch / monai / transformers never imported (seconds, not a minute)."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "index.json").write_text("{}", encoding="utf-8")
    (tmp_path / "empty").mkdir()
    fill = {"tmp": str(tmp_path), "store": str(store)}
    argv = [a.format(**fill) for a in args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", T3D_CACHE_DIR=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-c", _PROBE, str(TOOLS / script), *argv], cwd=ROOT,
                         env=env, capture_output=True, encoding="utf-8", timeout=120)
    assert "EXIT 2" in res.stdout, res.stdout + res.stderr[-2000:]
    assert "HEAVY []" in res.stdout, res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert needle.format(**fill) in lines[0]
    assert sorted(tmp_path.rglob("*.json")) == [store / "index.json"]  # nothing written
