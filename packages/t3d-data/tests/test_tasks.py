"""Dataset-provided tasks: the registry and store lookup, and the phantom provider's contents."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import t3d_data.tasks as tasks_mod
from t3d_data import (
    DatasetTasks,
    TasksError,
    VolumeStore,
    available_tasks,
    get_tasks,
    prepare,
    register_tasks,
    require_tasks,
    tasks_for_store,
    twin_reports,
)
from t3d_data.phantom import (
    FINDINGS,
    FINDINGS_SIDECAR,
    LABELS,
    PHANTOM_TASKS,
    ZERO_SHOT_PROMPTS,
    PhantomTwins,
    find_findings_sidecar,
    generate_phantom_dataset,
    render_report,
    twin_findings,
)


@pytest.fixture(scope="module")
def phantom_store(tmp_path_factory):
    """A phantom prepared into a store that is not next to its manifest (ROOT/elsewhere/store)."""
    root = tmp_path_factory.mktemp("ph")
    manifest = generate_phantom_dataset(root / "phantom", n_studies=4, seed=0, shape=(48, 48, 48),
                                        progress=False)
    store = root / "elsewhere" / "deeper" / "store"
    prepare(manifest, store, progress=False)
    return store, root / "phantom" / FINDINGS_SIDECAR


@pytest.fixture
def plain_store(tmp_path, make_dataset):
    out = tmp_path / "plain_store"
    prepare(make_dataset(2), out, progress=False)
    return out


def test_phantom_provider_contents():
    t = get_tasks("phantom")
    assert t is PHANTOM_TASKS and t.name == "phantom" and "phantom" in available_tasks()
    assert t.zero_shot_prompts is ZERO_SHOT_PROMPTS
    assert set(t.zero_shot_prompts) == set(FINDINGS)
    for prompts in t.zero_shot_prompts.values():
        assert len(prompts["positive"]) >= 2 and len(prompts["negative"]) >= 2
    # the benchmark's five classes, written out as the label values of the phantom's maps
    assert t.classes() == {"lungs": [2, 3, 12], "heart": [4], "liver": [6, 14], "spleen": [7],
                           "kidneys": [8, 9, 15]}
    names = {v: k for k, v in LABELS.items()}
    assert [names[v] for v in t.classes()["kidneys"]] == ["kidney_right", "kidney_left",
                                                          "kidney_cyst"]
    assert t.require("zero_shot") is t and t.require("segmentation") is t
    assert t.prompts_for(["kidney_cyst", "not_a_finding", "lung_nodule"]) == {
        k: ZERO_SHOT_PROMPTS[k] for k in ("lung_nodule", "kidney_cyst")}


def test_lookup_finds_the_phantom_by_its_sources_and_nothing_for_other_stores(
        phantom_store, plain_store):
    store, sidecar = phantom_store
    assert find_findings_sidecar(store) == sidecar  # via the recorded source paths
    assert tasks_for_store(store) is PHANTOM_TASKS
    assert require_tasks(store, "twins") is PHANTOM_TASKS
    assert tasks_for_store(plain_store) is None
    with pytest.raises(TasksError, match=r"has no dataset tasks, so zero_shot has no "
                                         r"zero_shot_prompts; name a provider \(--tasks NAME"):
        require_tasks(plain_store, "zero_shot")
    assert tasks_for_store(plain_store, "phantom") is PHANTOM_TASKS  # named: no detection
    assert PHANTOM_TASKS.report_twins(plain_store) is None  # ... but no sidecar, so no twins
    with pytest.raises(TasksError, match="no dataset tasks named 'btcv'; known: phantom"):
        tasks_for_store(plain_store, "btcv")
    with pytest.raises(TasksError, match="does not exist"):
        PHANTOM_TASKS.report_twins(plain_store, plain_store / "missing.jsonl")
    # the demo layout: the sidecar in a sibling folder of the store
    shutil.copy(sidecar, plain_store.parent / FINDINGS_SIDECAR)
    assert tasks_for_store(plain_store) is PHANTOM_TASKS


def test_phantom_twins_match_a_naive_rendering(phantom_store):
    store, sidecar = phantom_store
    records = {json.loads(x)["study_id"]: json.loads(x)
               for x in sidecar.read_text(encoding="utf-8").splitlines() if x.strip()}
    twins = PHANTOM_TASKS.report_twins(store)
    assert isinstance(twins, PhantomTwins)
    ids = [*sorted(records), "not_a_phantom_study"]
    rows, texts, attrs = twin_reports(twins, ids, per_study=3, seed=4)
    # naive reference: what the evaluation did by hand before providers existed
    ref_rows, ref_texts, ref_attrs = [], [], []
    for row, sid in enumerate(ids):
        if sid not in records:
            continue
        rng = np.random.default_rng([4, row, 17])
        for _ in range(3):
            twin, change = twin_findings(records[sid]["findings"], rng)
            ref_texts.append(render_report(twin, seed=records[sid]["report_seed"],
                                           reserved=records[sid]["reserved"]))
            ref_rows.append(row)
            ref_attrs.append("size" if change["attribute"] == "size_mm" else change["attribute"])
    assert (rows, texts, attrs) == (ref_rows, ref_texts, ref_attrs)
    assert rows == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] and "size_mm" not in attrs
    stored = {r.study_id: r.report for r in VolumeStore(store).records}
    for sid, rec in records.items():  # the sidecar re-renders each study's own report
        if not rec["short_normal"]:
            own = render_report(rec["findings"], seed=rec["report_seed"], reserved=rec["reserved"])
            assert " ".join(own.split()) == " ".join(stored[sid].split())
    assert all(t != render_report(records[ids[r]]["findings"], seed=records[ids[r]]["report_seed"],
                                  reserved=records[ids[r]]["reserved"])
               for r, t in zip(rows, texts, strict=True))


def test_custom_provider_registration_and_validation(monkeypatch, plain_store):
    monkeypatch.setattr(tasks_mod, "_REGISTRY", {})
    mine = DatasetTasks(name="mine", zero_shot_prompts={"nodule": {"positive": ["a nodule"],
                                                                   "negative": ["no nodule"]}},
                        detect=lambda store: (store / "index.json").is_file())
    register_tasks(mine)
    assert available_tasks() == ["mine", "phantom"]
    assert tasks_for_store(plain_store) is mine
    with pytest.raises(TasksError, match="provide no seg_classes, which segmentation needs"):
        require_tasks(plain_store, "segmentation")
    assert mine.report_twins(plain_store) is None
    with pytest.raises(ValueError, match="already registered"):
        register_tasks(mine)
    with pytest.raises(ValueError, match=r"zero_shot_prompts\['x'\] needs a non-empty list of "
                                         "'negative'"):
        DatasetTasks(name="bad", zero_shot_prompts={"x": {"positive": ["p"], "negative": []}})
    with pytest.raises(ValueError, match="label value 3 is in both 'a' and 'b'"):
        DatasetTasks(name="bad", seg_classes={"a": [1, 3], "b": [3]})
    with pytest.raises(ValueError, match="must be > 0"):
        DatasetTasks(name="bad", seg_classes={"a": [0]})
