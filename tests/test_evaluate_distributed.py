"""tools/evaluate.py under a real 2-process ``accelerate launch`` gives the 1-process results.

Two gloo CPU processes (tools/accelerate/cpu_2proc.yaml: MULTI_GPU + use_cpu; ``--cpu
--num_processes 2`` would silently run one) each embed half of the studies with
``t3d_eval.embed_volumes``, which gathers them back in study order. The written results must be
those of one process: the same studies, the same retrieval, twin and zero-shot numbers. The
1-process numbers are checked against values recomputed from the per-study ranks, and the chance
values against ``t3d_eval.chance_retrieval`` of the studies' reports.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDIES = 6
ARGS = ["--set", "split=null", "--set", f"max_studies={STUDIES}", "--set", "embedding.mode=random",
        "--set", "embedding.num_crops=1", "--set", "twins_per_study=1", "--set", "runtime.threads=1"]


def _env(tmp: Path) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                OMP_NUM_THREADS="1", T3D_CACHE_DIR=str(tmp / "cache"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(phantom_store) -> Path:
    return phantom_store(8, shape=(64, 64, 64))


def _evaluate(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=ROOT, env=_env(tmp), capture_output=True, text=True,
                         encoding="utf-8", errors="replace", timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def _close(a, b, path=""):
    """``a == b`` with floats to 1e-6 (the same crops, possibly other reduction orders)."""
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            _close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-6, nan_ok=True), path
    else:
        assert a == b, path


@pytest.mark.slow
def test_two_process_evaluate_equals_one_process(store, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    evaluate = str(ROOT / "tools" / "evaluate.py")
    res1 = _evaluate([sys.executable, evaluate, "--store", str(store), "--out", str(one), *ARGS],
                     tmp_path)
    res2 = _evaluate([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                      str(ROOT / "tools" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port",
                      str(_free_port()), evaluate, "--store", str(store), "--out", str(two),
                      *ARGS], tmp_path)
    r1 = json.loads((one / "eval.json").read_text(encoding="utf-8"))
    r2 = json.loads((two / "eval.json").read_text(encoding="utf-8"))
    # two processes really ran: the results say so, and the main process's bar embedded its half
    assert r1["config"]["processes"] == 1 and r2["config"]["processes"] == 2
    bar = r"embed: 100%\|[^|]*\| {0}/{0} "
    assert re.search(bar.format(STUDIES), res1.stderr), res1.stderr[-2000:]
    assert re.search(bar.format(STUDIES // 2), res2.stderr), res2.stderr[-2000:]
    assert res2.stdout.count("wrote ") == 1 and res2.stdout.count("Retrieval on ") == 1
    r2["config"]["processes"] = 1
    _close(r1, r2)
    assert r1["studies"] == STUDIES and r1["twin_accuracy"]["count"] == STUDIES
    assert {"retrieval", "twin_accuracy", "zero_shot_auc", "chance"} <= set(r1)
    assert r1["config"]["tasks"] == "phantom"

    # the 1-process numbers are the per-study ranks' (in-process, one "process", same config)
    import numpy as np
    import torch
    from t3d_eval import chance_retrieval
    from t3d_train.eval_common import parse_config
    from t3d_train.eval_config import EvaluateConfig
    from t3d_train.evaluation import evaluate as run_evaluate

    cfg = parse_config(EvaluateConfig, ["--store", str(store), "--out", str(tmp_path / "x"),
                                        *ARGS], "", {"store": "store", "out": "out"})
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0,
                          is_main_process=True)
    ref = run_evaluate(cfg, accelerator=acc, write=False, per_study=True)
    per = ref.pop("per_study")
    _close(json.loads(json.dumps(r1["retrieval"])), ref["retrieval"])
    for side in ("v2r", "r2v"):
        ranks = np.array(per[f"{side}_rank"])
        assert len(ranks) == STUDIES
        for k in (1, 5, 10):
            assert r1["retrieval"][f"{side}_recall@{k}"] == pytest.approx(np.mean(ranks <= k))
        assert r1["retrieval"][f"{side}_median_rank"] == pytest.approx(np.median(ranks))
        assert r1["retrieval"][f"{side}_mean_rank"] == pytest.approx(np.mean(ranks))
    from t3d_data import VolumeDataset

    ds = VolumeDataset(store, split=None)
    reports = [ds.store.records[ds.indices[i]].report for i in range(STUDIES)]
    assert per["study_ids"] == [ds.store.records[ds.indices[i]].study_id for i in range(STUDIES)]
    assert r1["chance"]["retrieval"] == pytest.approx(chance_retrieval(reports))
