"""Results files (JSON + Markdown) and seed aggregation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from t3d_eval import MeanStd, aggregate_seeds, read_results, write_results


def test_json_round_trip_and_markdown(tmp_path: Path):
    results = {
        "retrieval": {"v2r_recall@1": 0.25, "v2r_median_rank": 3.0},
        "zero_shot": {"nodule": 0.81, "effusion": math.nan, "macro": 0.81, "skipped": ["effusion"]},
        "segmentation": {"liver": MeanStd(0.9, 0.01)},
        "n_studies": 12,
    }
    json_path, md_path = write_results(results, tmp_path / "out", "eval")
    json.loads(json_path.read_text(encoding="utf-8"), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    back = read_results(json_path)
    assert math.isnan(back["zero_shot"]["effusion"])
    back["zero_shot"]["effusion"] = results["zero_shot"]["effusion"] = None
    assert back == results and isinstance(back["segmentation"]["liver"], MeanStd)
    md = md_path.read_text(encoding="utf-8")
    assert "| retrieval/v2r_recall@1 | 0.2500 |" in md
    assert "| zero_shot/skipped | effusion |" in md
    assert "| segmentation/liver | 0.9000 ± 0.0100 |" in md


def test_markdown_one_column_per_run(tmp_path: Path):
    runs = {"t3d": {"dice": {"liver": 0.9}}, "scratch": {"dice": {"liver": 0.8}}}
    _, md = write_results(runs, tmp_path, "seg")
    text = md.read_text(encoding="utf-8")
    assert "| metric | t3d | scratch |" in text and "| dice/liver | 0.9000 | 0.8000 |" in text


def test_aggregate_seeds():
    runs = [
        {"auc": {"macro": 0.7, "a": math.nan}, "steps": 10, "skipped": ["a"]},
        {"auc": {"macro": 0.8, "a": 0.6}, "steps": 10, "skipped": ["a"]},
        {"auc": {"macro": torch.tensor(0.9).item(), "a": 0.7}, "steps": 10, "skipped": []},
    ]
    agg = aggregate_seeds(runs)
    assert agg["auc"]["macro"].mean == pytest.approx(0.8)
    assert agg["auc"]["macro"].std == pytest.approx(np.std([0.7, 0.8, 0.9], ddof=1))
    assert agg["auc"]["a"] == pytest.approx(MeanStd(0.65, np.std([0.6, 0.7], ddof=1)))
    assert agg["steps"] == MeanStd(10.0, 0.0)
    assert agg["skipped"] == [["a"], ["a"], []]
    assert aggregate_seeds([{"x": 1.0}])["x"] == MeanStd(1.0, 0.0)
    with pytest.raises(ValueError):
        aggregate_seeds([])


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "a\\b", ".hidden", "x\0y", ""])
def test_write_results_refuses_names_that_are_not_one_file_stem(tmp_path, name):
    with pytest.raises(ValueError, match="plain file stem"):
        write_results({"a": 1}, tmp_path / "out", name)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_write_results_replaces_atomically(tmp_path):
    write_results({"a": 1}, tmp_path, "r")
    bad = {"a": object()}  # not serialisable: nothing may change, no temp file left behind
    with pytest.raises(TypeError):
        write_results(bad, tmp_path, "r")
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]
