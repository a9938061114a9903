"""The frozen benchmark suites (t3d_train.suite, tools/benchmark.py) on a tiny phantom store.

The phantom suites run end to end on CPU through the same functions as a CT-RATE run: the
zero-shot suite through the tool's ``main`` (with --update-docs into a scratch results.md), the
retrieval, segmentation and classification suites through ``run_suite`` (budget overrides keep
segmentation to one fine-tuning step); the refusal runs the tool as a subprocess. Checked: the output JSON's fields (suite name + version + file hash,
checkpoint sha256, preprocessing record, store, command), that every interval brackets its
estimate, that point estimates equal the evaluation's own numbers, the Markdown tables, and
that a store without labels, masks or a split is refused with one line before torch loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "benchmark.py"


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=ROOT, env=env,
                          capture_output=True, encoding="utf-8", timeout=timeout)


def _tool():
    """tools/benchmark.py as a module (its ``main(argv)`` is what the command runs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(phantom_store, tmp_path_factory):
    """A 10-study 64³ phantom store (train 6 / val 2 / test 2) and a tiny random checkpoint."""
    import torch
    from t3d_models import T3DModel

    store = phantom_store(10, (64, 64, 64), seed=0)
    root = tmp_path_factory.mktemp("suites")
    torch.manual_seed(0)
    T3DModel.from_preset("t3d-tiny-cpu").save_pretrained(root / "ckpt")
    return {"store": store, "ckpt": root / "ckpt", "root": root}


def _check_intervals(arm: dict) -> int:
    finite = 0
    for name, row in arm["metrics"].items():
        assert set(row) >= {"estimate", "low", "high", "resamples"}, name
        e, lo = row["estimate"], row["low"]
        if e is None or lo is None or not (math.isfinite(e) and math.isfinite(lo)):
            continue  # undefined on this tiny split (a finding with one class)
        assert row["low"] - 1e-9 <= row["estimate"] <= row["high"] + 1e-9, (name, row)
        finite += 1
    return finite


# ------------------------------------------------------------------ suite files (no torch)

def test_every_shipped_suite_loads_and_is_frozen():
    from t3d_train.suite import available_suites, describe_suites, load_suite

    names = available_suites()
    assert {"ct-rate-zeroshot", "ct-rate-retrieval", "rad-chestct-zeroshot", "btcv-seg",
            "msd-seg", "brats-seg", "phantom-zeroshot", "phantom-retrieval", "phantom-seg",
            "phantom-classification"} <= set(names)
    for name in names:
        suite, prov = load_suite(name)
        assert suite.name == name and suite.version >= 1 and suite.bootstrap.unit == "patient"
        assert prov["sha256"] == hashlib.sha256(Path(prov["file"]).read_bytes()).hexdigest()
    assert len(describe_suites()) == len(names)
    ct = load_suite("ct-rate-zeroshot")[0]
    assert len(ct.labels) == 18 and ct.splits.threshold not in (None, ct.splits.test)
    assert ct.prompt_set()["Lung nodule"] == {
        "positive": ["Lung nodule is present.", "There is lung nodule."],
        "negative": ["Lung nodule is not present.", "There is no lung nodule."]}
    # the suites name what the importers write (labels, splits)
    from t3d_data.sources import btcv, ct_rate, rad_chestct

    assert ct.labels == list(ct_rate.ABNORMALITIES)
    assert (ct.splits.test, ct.splits.threshold) == ("test", "val")  # official valid -> test
    rad = load_suite("rad-chestct-zeroshot")[0]
    assert set(rad.labels) == set(rad_chestct.SHARED_LABELS.values()) <= set(ct.labels)
    bt = load_suite("btcv-seg")[0]
    assert bt.label_fractions == [0.01, 0.1, 1.0] and (bt.splits.train, bt.splits.test) == (
        "train", "val")
    assert sorted(v for vs in bt.classes.values() for v in vs) == sorted(
        int(k) for k in btcv.LABELS if int(k) > 0)  # the 13 organs of dataset_0.json


def test_phantom_suites_are_frozen_copies_of_the_phantom_tasks():
    from t3d_data.phantom import ZERO_SHOT_PROMPTS
    from t3d_data.phantom.tasks import PHANTOM_SEG_CLASSES
    from t3d_train.suite import load_suite

    zs = load_suite("phantom-zeroshot")[0]
    assert zs.prompt_set() == {k: ZERO_SHOT_PROMPTS[k] for k in zs.labels}
    assert set(zs.labels) == set(ZERO_SHOT_PROMPTS)
    assert load_suite("phantom-seg")[0].classes == PHANTOM_SEG_CLASSES


def test_protocol_keys_cannot_be_overridden(tmp_path):
    from t3d_train.suite import SuiteError, load_suite

    suite, prov = load_suite("phantom-seg", ["finetune.steps=1", "label_fractions=[1.0]"])
    assert suite.finetune.steps == 1 and prov["overrides"] == ["finetune.steps=1",
                                                                "label_fractions=[1.0]"]
    with pytest.raises(SuiteError, match="only the budget may be overridden"):
        load_suite("phantom-zeroshot", ["splits.threshold=test"])
    with pytest.raises(SuiteError, match="no suite named 'nope'"):
        load_suite("nope")
    bad = tmp_path / "mine.yaml"
    text = (load_suite("phantom-zeroshot")[1]["file"])
    bad.write_text(Path(text).read_text(encoding="utf-8").replace("name: phantom-zeroshot", "name: mine")
                   .replace("threshold: val", "threshold: test"))
    with pytest.raises(SuiteError, match="splits.threshold must differ from splits.test"):
        load_suite(bad)


# ------------------------------------------------------------------ refusals (before torch)

def _strip(manifest: Path, out: Path, drop: tuple[str, ...]) -> Path:
    lines = [json.loads(x) for x in manifest.read_text(encoding="utf-8").splitlines() if x.strip()]
    out.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in drop}) + "\n"
                           for r in lines))
    return out


def test_a_store_without_labels_masks_or_split_is_refused(setup):
    from t3d_data import prepare
    from t3d_train.suite import SuiteError, check_store_for, load_suite

    raw = setup["store"].parent / "raw"
    bare = _strip(raw / "manifest.jsonl", raw / "bare.jsonl", ("labels", "mask"))
    store = setup["root"] / "bare-store"
    prepare(bare, store, progress=False)
    with pytest.raises(SuiteError) as err:
        check_store_for(load_suite("phantom-zeroshot")[0], store)
    msg = str(err.value)
    assert "\n" not in msg and "cannot run suite phantom-zeroshot v1" in msg
    assert "no labels ['lung_nodule'" in msg and "(the store has none)" in msg
    with pytest.raises(SuiteError, match="no masks in the 'train' split"):
        check_store_for(load_suite("phantom-seg")[0], store)
    with pytest.raises(SuiteError, match=r"no labels \['Cardiomegaly', .*\] \(the store has "
                                         r"\['cardiomegaly'"):
        check_store_for(load_suite("rad-chestct-zeroshot")[0], setup["store"])  # wrong dataset
    split = load_suite("phantom-zeroshot", ["embedding.overlap=0.5"])[0].model_copy(
        update={"splits": load_suite("phantom-zeroshot")[0].splits.model_copy(
            update={"threshold": "tune"})})
    with pytest.raises(SuiteError, match=r"no 'tune' split \(threshold; the store has "
                                         r"\['test', 'train', 'val'\]\)"):
        check_store_for(split, setup["store"])
    # the CLI: one `error:` line, exit 2, before torch is imported (about a second)
    res = _run(["phantom-zeroshot", "--checkpoint", str(setup["ckpt"]), "--store", str(store),
                "--out", str(setup["root"] / "refused")])
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: store ") and "no labels" in lines[0]
    assert not (setup["root"] / "refused").exists()


# ------------------------------------------------------------------ end to end

def test_phantom_zeroshot_cli_writes_json_markdown_and_docs(setup):
    out, md = setup["root"] / "out", setup["root"] / "results.md"
    md.write_text("# Results\n\nkept\n\n<!-- suite:phantom-zeroshot:start -->\nold\n"
                  "<!-- suite:phantom-zeroshot:end -->\n", encoding="utf-8")
    args = ["phantom-zeroshot", "--checkpoint", str(setup["ckpt"]), "--store",
            str(setup["store"]), "--out", str(out), "--update-docs"]
    assert _tool().main([*args, "--results-md", str(md)]) == 0  # in-process: no import cost
    r = json.loads((out / "phantom-zeroshot.json").read_text(encoding="utf-8"))
    assert r["suite"]["name"] == "phantom-zeroshot" and r["suite"]["version"] == 1
    assert r["suite"]["frozen"] is True
    weights = (setup["ckpt"] / "model.safetensors").read_bytes()
    assert r["checkpoint"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert r["preprocessing"]["hu_window"] == [-1000.0, 1000.0]
    assert r["preprocessing"]["crop_size"] == [64, 64, 64]
    assert r["store"]["path"] == str(setup["store"])
    assert r["store"]["splits"]["test"]["studies"] == 2
    assert r["command"] == "python tools/benchmark.py " + " ".join(args)
    assert r["bootstrap"]["unit"] == "patient" and r["bootstrap"]["resamples"] == 1000
    assert set(r["arms"]) == {"checkpoint", "baseline"}
    for arm in r["arms"].values():
        assert _check_intervals(arm) >= 3
        assert {"macro AUC", "macro F1", "macro balanced accuracy", "lung_nodule AUC"} <= set(
            arm["metrics"])
        t = arm["thresholds"]
        assert t["split"] == "val" and t["rule"] == "youden" and t["studies"] == 2
    text = (out / "phantom-zeroshot.md").read_text(encoding="utf-8")
    assert "### Suite `phantom-zeroshot` v1" in text and r["checkpoint"]["sha256"][:16] in text
    assert "| metric | checkpoint | random init (baseline) |" in text
    assert "| macro AUC | " in text and "thresholds chosen on the 'val' split" in text
    docs = md.read_text(encoding="utf-8")
    assert "kept" in docs and "old" not in docs and "**Measured here**" in docs
    assert "| data | model | macro AUC | macro F1 | macro balanced accuracy |" in docs
    assert "--results-md" not in docs


def test_phantom_retrieval_seg_and_classification_in_process(setup):
    import t3d_eval as ev
    from t3d_data.store import VolumeStore
    from t3d_train.suite import docs_block, load_suite, run_suite

    out = setup["root"] / "inproc"
    suite, prov = load_suite("phantom-retrieval")
    r = run_suite(suite, prov, setup["ckpt"], setup["store"], out, baseline=False)
    arm = r["arms"]["checkpoint"]
    _check_intervals(arm)
    for key, row in arm["metrics"].items():  # the bootstrap's estimate = evaluate()'s number
        assert row["estimate"] == pytest.approx(row["check"]), key
    assert json.loads((out / "phantom-retrieval.json").read_text(encoding="utf-8"))["arms"]["checkpoint"]

    suite, prov = load_suite("phantom-seg", ["finetune.steps=1", "label_fractions=[1.0]",
                                             "finetune.sw_batch_size=1"])
    r = run_suite(suite, prov, setup["ckpt"], setup["store"], out, baseline=False)
    assert set(r["arms"]) == {"checkpoint"} and r["suite"]["frozen"] is False
    for arm in r["arms"].values():
        _check_intervals(arm)
        m = arm["metrics"]
        assert list(m)[0] == "mean Dice @ 100%"
        assert {f"{c} Dice @ 100%" for c in suite.classes} <= set(m)
        have = [m[f"{c} Dice @ 100%"]["estimate"] for c in suite.classes]
        have = [x for x in have if x is not None and math.isfinite(x)]
        assert m["mean Dice @ 100%"]["estimate"] == pytest.approx(np.mean(have))
        assert arm["fractions"]["100%"]["train_studies_used"] == 6
    text = (out / "phantom-seg.md").read_text(encoding="utf-8")
    assert "**Not the frozen suite**" in text and "| mean Dice @ 100% |" in text

    suite, prov = load_suite("phantom-classification")
    r = run_suite(suite, prov, setup["ckpt"], setup["store"], out, baseline=False)
    arm = r["arms"]["checkpoint"]
    _check_intervals(arm)
    assert arm["train_studies"] == 6 and arm["test_studies"] == 2
    names = VolumeStore(setup["store"]).finding_names
    assert set(suite.labels) == set(names)
    block = docs_block(suite, r)
    assert "| data | model | macro AUC |" in block and "| phantom (" in block
    empty = docs_block(load_suite("ct-rate-zeroshot")[0])
    assert "**Not measured here**" in empty and "| CT-RATE | checkpoint |  |  |  |" in empty
    assert ev.bootstrap_ci  # the intervals came from t3d_eval


def test_real_data_suites_accept_the_importers_stores(tmp_path):
    """Each real-data suite's store check passes on its importer's store (synthetic replicas of
    the layouts, t3d_data.sources.replica): the splits, labels and masks the suites name are the
    ones the importers write. No torch."""
    from t3d_data import prepare
    from t3d_data.sources import import_dataset, write_import
    from t3d_data.sources.replica import write_replica
    from t3d_data.store import VolumeStore
    from t3d_train.suite import SuiteError, check_store_for, load_suite

    cases = {"ct-rate": (["ct-rate-zeroshot", "ct-rate-retrieval"], 4, {"val_fraction": 0.25}),
             "btcv": (["btcv-seg"], 30, {}), "msd": (["msd-seg"], 5, {}),
             "brats": (["brats-seg"], 5, {}), "rad-chestct": (["rad-chestct-zeroshot"], 3, {})}
    for dataset, (suites, n, options) in cases.items():
        root = write_replica(dataset, tmp_path / dataset / "raw", n=n, seed=1)
        manifest = write_import(import_dataset(dataset, root, **options),
                                tmp_path / dataset / "manifest.jsonl")[0]
        store = tmp_path / dataset / "store"
        prepare(manifest, store, progress=False)
        for name in suites:
            suite = load_suite(name)[0]
            if dataset == "rad-chestct":  # the replica writes 3 of the label columns only
                have = VolumeStore(store).finding_names
                assert set(have) < set(suite.labels)
                with pytest.raises(SuiteError) as err:
                    check_store_for(suite, store)
                missing = [lab for lab in suite.labels if lab not in have]
                assert f"no labels {missing} (the store has {have})" in str(err.value)
                continue
            info = check_store_for(suite, store)
            assert set(info["splits"]) == set(suite.splits_needed().values()), name
            assert all(v["studies"] >= 1 for v in info["splits"].values()), name
    btcv = check_store_for(load_suite("btcv-seg")[0], tmp_path / "btcv" / "store")["splits"]
    assert (btcv["train"]["studies"], btcv["val"]["studies"]) == (24, 6)  # dataset_0.json
