"""Dataset importers on synthetic replicas of each layout (issue 11.1): write_replica -> import
-> load_manifest (-> prepare where the pitfall is in the voxels), checking each pitfall."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from t3d_data import VolumeStore, load_manifest, prepare
from t3d_data.cli import main
from t3d_data.sources import ImportError_, import_dataset, write_import
from t3d_data.sources.ct_rate import ABNORMALITIES
from t3d_data.sources.replica import write_replica


def _import(name, root, out, **options):
    result = import_dataset(name, root, **options)
    written = write_import(result, out)
    return result, load_manifest(out), written


def _rows(path):
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_ct_rate_ids_splits_report_labels_and_hu(tmp_path):
    root = write_replica("ct-rate", tmp_path / "CT-RATE", n=4, seed=1)
    data = root / "dataset"
    reports = data / "radiology_text_reports/train_reports.csv"
    with reports.open("a", encoding="utf-8", newline="") as f:  # two bad rows, lines 7 and 8
        csv.writer(f).writerows([["train_9_a.nii.gz", "", "", "Findings.", "Ok."],
                                 ["train_9_a_1.nii.gz", "", "", "Findings.", "Ok."]])
    result, recs, written = _import("ct-rate", root, tmp_path / "m" / "ct.jsonl",
                                    val_fraction=0.25, seed=0)
    assert [str(b) for b in result.bad] == [
        f"{reports} line 7: VolumeName 'train_9_a.nii.gz' is not of the form "
        "train_<patient>_<scan>_<reconstruction>.nii.gz",
        f"{reports} line 8: train_9_a_1.nii.gz: no row in train_metadata.csv (its rescale "
        "slope/intercept and spacing are needed)"]
    by_id = {r.study_id: r for r in recs}
    assert sorted(by_id) == ["train_1_a_1", "train_1_a_2", "train_2_a_1", "train_3_a_1",
                             "train_4_a_1", "valid_1_a_1", "valid_2_a_1"]
    # patient numbers restart per official split: valid_1 is not train_1
    assert by_id["valid_1_a_1"].patient_id == "valid_1" != by_id["train_1_a_1"].patient_id
    assert by_id["train_1_a_2"].patient_id == "train_1"
    assert by_id["train_1_a_2"].meta["ct_rate"]["scan_id"] == "train_1_a"
    assert by_id["train_1_a_2"].meta["ct_rate"]["reconstruction"] == 2
    # official valid -> test; one of the 4 train patients -> val, whole patients only
    assert {r.split for r in recs if r.patient_id.startswith("valid_")} == {"test"}
    split_of = {}
    for r in recs:
        assert split_of.setdefault(r.patient_id, r.split) == r.split
    assert sorted(v for k, v in split_of.items() if k.startswith("train_")).count("val") == 1
    # report text: FINDINGS then IMPRESSION, from the CSV; an empty field is left out
    src = {row["VolumeName"]: row for row in _rows(reports)}
    row = src["train_2_a_1.nii.gz"]
    assert by_id["train_2_a_1"].report == (f"FINDINGS: {row['Findings_EN']}\n\nIMPRESSION: "
                                           f"{row['Impressions_EN']}")
    assert by_id["train_2_a_1"].meta["ct_rate"]["technique"] == row["Technique_EN"]
    assert by_id["valid_1_a_1"].report.startswith("FINDINGS: ")
    assert "IMPRESSION" not in by_id["valid_1_a_1"].report
    labels = {r["VolumeName"]: r for r in _rows(
        data / "multi_abnormality_labels/train_predicted_labels.csv")}
    assert by_id["train_3_a_1"].labels == {n: int(labels["train_3_a_1.nii.gz"][n])
                                           for n in ABNORMALITIES}
    prompts = json.loads(written[1].read_text(encoding="utf-8"))
    assert written[1].name == "ct.prompts.json" and len(prompts) == 18
    assert prompts["Lung nodule"] == {"positive": ["Lung nodule is present."],
                                      "negative": ["Lung nodule is not present."]}
    # HU: stored values + the metadata's intercept; spacing from the metadata; LPS -> RAS
    prepare(tmp_path / "m" / "ct.jsonl", tmp_path / "store", chunk=16, progress=False)
    store = VolumeStore(tmp_path / "store")
    meta = {r["VolumeName"]: r for r in _rows(data / "metadata/train_metadata.csv")}
    fixed = "train_4_a_1"  # re-written with a complete header and HU values
    for i, rec in enumerate(store.records):
        if not rec.study_id.startswith("train_"):
            continue
        m = meta[rec.study_id + ".nii.gz"]
        stored = np.asarray(nib.load(rec.source).dataobj.get_unscaled(), dtype=np.float64)
        if rec.study_id == fixed:  # read as it is: not shifted by the intercept a second time
            assert stored.min() < -900
            np.testing.assert_array_equal(store.read(i), stored[::-1, ::-1, :])
        else:
            hu = stored * float(m["RescaleSlope"]) + float(m["RescaleIntercept"])
            np.testing.assert_array_equal(store.read(i), hu[::-1, ::-1, :])  # LPS -> RAS
        xy = json.loads(m["XYSpacing"])
        np.testing.assert_allclose(rec.spacing, [xy[0], xy[1], float(m["ZSpacing"])], rtol=1e-6)


def test_header_fallback_rules(tmp_path):
    from t3d_data.header import header_fallback

    blank_path = tmp_path / "b.nii"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), None), blank_path)
    blank = nib.load(blank_path).header
    meta = {"rescale_slope": 2.0, "rescale_intercept": -1000.0, "spacing": [0.5, 0.6, 2.0],
            "orientation_lps": [0, 1, 0, 1, 0, 0], "origin_lps": [10.0, 20.0, 30.0]}
    slope, inter, affine = header_fallback(blank_path, blank, 1.0, 0.0, np.eye(4), meta)
    assert (slope, inter) == (2.0, -1000.0)
    # naive: axis 0 along the row cosine (LPS y), axis 1 along the column cosine (LPS x),
    # axis 2 along row x column; LPS -> RAS negates x and y
    row, col = np.array([0, 1, 0]), np.array([1, 0, 0])
    normal = np.cross(row, col)
    expect = np.eye(4)
    for k, (d, s) in enumerate(zip((row, col, normal), (0.5, 0.6, 2.0), strict=True)):
        expect[:3, k] = d * s * np.array([-1, -1, 1])
    expect[:3, 3] = [-10.0, -20.0, 30.0]
    np.testing.assert_allclose(affine, expect)
    # a header whose voxel sizes match the metadata is complete: read as it is
    full = tmp_path / "full.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.diag([-0.5, -0.6, 2.0, 1.0])), full)
    img = nib.load(full)
    keep = header_fallback(full, img.header, 1.0, 0.0, img.affine, meta)
    assert keep[:2] == (1.0, 0.0)
    np.testing.assert_array_equal(keep[2], img.affine)
    # no geometry on disk (nibabel writes scl_slope 1 / scl_inter 0): the metadata applies
    blank_file = tmp_path / "blank.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), None), blank_file)
    img = nib.load(blank_file)
    assert header_fallback(blank_file, img.header, 1.0, 0.0, img.affine, meta)[:2] == (2.0,
                                                                                    -1000.0)
    from t3d_data import VolumeReadError

    with pytest.raises(VolumeReadError, match=r"meta.header.spacing"):
        header_fallback(blank_path, blank, 1.0, 0.0, np.eye(4), {"spacing": [1, 2]})


def test_bimcv_r_language_translations_ids_and_splits(tmp_path):
    root = write_replica("bimcv-r", tmp_path / "bimcv", n=6, seed=2)
    table = _rows(root / "meta/curated_ct_report_path_En.csv")
    result, recs, _ = _import("bimcv-r", root, tmp_path / "es.jsonl", seed=0)
    assert {r.language for r in recs} == {"es"}
    src = {row["path"].split("/")[-1]: row for row in table}
    for r in recs:
        row = src[r.meta["volume_name"]]
        assert r.report == row["Report_es"]
        assert r.meta["translations"] == {"en": row["Report_en"]}
    first = [r for r in recs if r.patient_id == "sub-S00001"]
    assert [r.study_id for r in first] == ["sub-S00001_ses-E00101_run-1",
                                           "sub-S00001_ses-E00102_run-1"]
    assert len({r.split for r in first}) == 1  # one patient, one split
    assert {r.split for r in recs} <= {"train", "val", "test"}
    _, en, _ = _import("bimcv-r", root, tmp_path / "en.jsonl", language="en")
    assert {r.language for r in en} == {"en"}
    assert en[0].report == src[en[0].meta["volume_name"]]["Report_en"]
    assert en[0].meta["translations"]["es"] == src[en[0].meta["volume_name"]]["Report_es"]
    # only English reports: importing Spanish fails naming the columns and the fix
    (root / "meta/curated_ct_report_path_En.csv").write_text(
        "path,Report_en\n" + "".join(f"{r['path']},{r['Report_en']}\n" for r in table),
        encoding="utf-8")
    with pytest.raises(ImportError_, match=r"no Report_es or Report column .*--language en"):
        import_dataset("bimcv-r", root)


def test_rad_chestct_shared_labels_only(tmp_path):
    root = write_replica("rad-chestct", tmp_path / "rad", n=3, seed=3)
    result, recs, written = _import("rad-chestct", root, tmp_path / "rad.jsonl")
    table = _rows(root / "imgtest_Abnormality_and_Location_Labels.csv")
    for row in table:
        rec = next(r for r in recs if r.study_id == row["NoteAcc_DEID"])
        assert rec.split == "test" and rec.report is None
        nodule = max(int(row["nodule*right_lung"]), int(row["nodule*left_lung"]))
        assert rec.labels == {"Lung nodule": nodule,
                              "Cardiomegaly": int(row["cardiomegaly*heart"]),
                              "Pleural effusion": int(row["pleural_effusion*right_lung"])}
    assert {r.split for r in recs} == {"train", "val", "test"}
    assert set(json.loads(written[1].read_text(encoding="utf-8"))) >= {"Lung nodule",
                                                                        "Cardiomegaly"}


def test_btcv_standard_split_and_class_names(tmp_path):
    root = write_replica("btcv", tmp_path / "btcv", n=30, shape=(12, 12, 8))
    split = json.loads((root / "dataset_0.json").read_text(encoding="utf-8"))
    result, recs, written = _import("btcv", root, tmp_path / "btcv.jsonl")
    train = [r for r in recs if r.split == "train"]
    val = [r for r in recs if r.split == "val"]
    assert len(train) == 24 and len(val) == 6
    assert [r.mask.name for r in val] == [e["label"].split("/")[1] for e in split["validation"]]
    assert {r.report for r in recs} == {None}
    classes = json.loads(written[1].read_text(encoding="utf-8"))
    assert classes == {name: [int(k)] for k, name in split["labels"].items() if k != "0"}
    assert len(classes) == 13 and classes["liver"] == [6]
    (root / "dataset_0.json").unlink()  # the built-in copy gives the same split
    again = import_dataset("btcv", root)
    assert [(r["study_id"], r["split"]) for r in again.rows] == [(r.study_id, r.split)
                                                                  for r in recs]


def test_msd_multimodality_and_label_names(tmp_path):
    root = write_replica("msd", tmp_path / "Task01_BrainTumour", n=5, shape=(12, 12, 8))
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    result, recs, written = _import("msd", root, tmp_path / "msd.jsonl", seed=1)
    assert len(recs) == 5 and all(r.modality == "MR" for r in recs)
    assert all(r.channels == ["FLAIR", "T1w", "t1gd", "T2w"] and r.n_channels == 4 for r in recs)
    assert not any(r.image.name.startswith("._") for r in recs)
    assert json.loads(written[1].read_text(encoding="utf-8")) == {
        "edema": [1], "non-enhancing tumor": [2], "enhancing tumour": [3]}
    assert {r.split for r in recs} == {"train", "val"} and meta["test"]
    with pytest.raises(ImportError_, match="no dataset.json"):
        import_dataset("msd", tmp_path)


@pytest.mark.parametrize("naming", ["2023", "2021"])
def test_brats_channels_timepoints_and_seg(tmp_path, naming):
    root = write_replica("brats", tmp_path / "brats", n=5, shape=(12, 12, 8), naming=naming)
    result, recs, written = _import("brats", root, tmp_path / "b.jsonl", seed=0)
    assert len(recs) == 6 and len(result.missing) == 1  # the case without seg
    assert "seg" in str(result.missing[0]) and not result.bad
    for r in recs:
        assert r.modality == "MR" and r.channels == ["t1n", "t1c", "t2w", "t2f"]
        assert len(r.image_paths) == 4 and r.mask is not None
    if naming == "2023":
        rec = next(r for r in recs if r.study_id == "BraTS-GLI-00001-001")
        assert [p.name for p in rec.image_paths] == [
            f"BraTS-GLI-00001-001-{c}.nii.gz" for c in ("t1n", "t1c", "t2w", "t2f")]
        same = [r for r in recs if r.patient_id == "BraTS-GLI-00001"]
        assert len(same) == 2 and len({r.split for r in same}) == 1  # timepoints stay together
    else:
        rec = recs[0]
        assert [p.name.rsplit("_", 1)[1] for p in rec.image_paths] == [
            "t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz"]
    et = 3 if naming == "2023" else 4
    assert json.loads(written[1].read_text(encoding="utf-8")) == {"NCR": [1], "ED": [2],
                                                                   "ET": [et]}


def test_import_command(tmp_path, capsys):
    root = write_replica("ct-rate", tmp_path / "CT-RATE", n=2)
    assert main(["import", "ct-rate", str(root), "-o", str(tmp_path / "ct.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "ct-rate: 4 studies of 3 patients (test 1, train 3); 0 bad rows" in out
    assert (tmp_path / "ct.prompts.json").is_file() and load_manifest(tmp_path / "ct.jsonl")
    meta = root / "dataset/metadata/train_metadata.csv"
    lines = meta.read_text(encoding="utf-8").splitlines()
    meta.write_text("\n".join([lines[0], lines[1].replace("[0.8, 0.8]", "[0.8]"), *lines[2:]])
                    + "\n", encoding="utf-8")
    assert main(["import", "ct-rate", str(root), "-o", str(tmp_path / "ct.jsonl")]) == 2
    err = capsys.readouterr().err
    assert (f"bad row: {meta} line 2: train_1_a_1.nii.gz: column XYSpacing/ZSpacing: expected 2 "
            "finite number(s), got '[0.8]'") in err
    assert "1 of 4 rows are bad (more than --max-bad-fraction 0.05)" in err
    assert main(["import", "btcv", str(root), "-o", str(tmp_path / "x.jsonl"),
                 "--language", "es"]) == 2
    assert "--language does not apply to btcv" in capsys.readouterr().err


def test_imported_manifests_prepare_channels_and_language_reach_the_store(tmp_path):
    brats = write_replica("brats", tmp_path / "brats", n=2, shape=(12, 12, 8))
    bimcv = write_replica("bimcv-r", tmp_path / "bimcv", n=2, shape=(12, 12, 8))
    for name, root in (("brats", brats), ("bimcv-r", bimcv)):
        _import(name, root, tmp_path / f"{name}.jsonl")
        prepare(tmp_path / f"{name}.jsonl", tmp_path / f"{name}-store", chunk=8, progress=False)
    mr = VolumeStore(tmp_path / "brats-store")
    assert {(r.n_channels, r.modality, tuple(r.channels)) for r in mr.records} == {
        (4, "MR", ("t1n", "t1c", "t2w", "t2f"))}
    assert mr.read(0).shape == (4, 12, 12, 8) and all(r.has_mask for r in mr.records)
    es = VolumeStore(tmp_path / "bimcv-r-store")
    assert {r.language for r in es.records} == {"es"}
    assert all(r.report for r in es.records)
