"""Manifest fields the dataset importers need (issue 11): channel lists, channel names,
modality, language, free ``meta``, optional reports, and how prepare / pre-training treat them."""

import json

import pytest
from t3d_data import (
    CropConfig,
    CropDataset,
    ManifestError,
    PretrainDataset,
    StoreError,
    StudyRecord,
    VolumeStore,
    load_manifest,
    prepare,
)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_channel_list_language_meta_and_optional_report(tmp_path):
    for name in ("t1n.nii.gz", "t2w.nii.gz", "ct.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    m = _jsonl(tmp_path / "studies.jsonl", [
        {"study_id": "mr", "patient_id": "p1", "image": ["t1n.nii.gz", "t2w.nii.gz"],
         "channels": ["t1n", "t2w"], "modality": "MR", "meta": {"grade": "HGG", "n": [1, 2]}},
        {"study_id": "ct", "patient_id": "p2", "image": "ct.nii.gz", "report": "Normal.",
         "language": "pt-BR"},
    ])
    mr, ct = load_manifest(m)
    assert mr.image_paths == (tmp_path / "t1n.nii.gz", tmp_path / "t2w.nii.gz")
    assert mr.n_channels == 2 and mr.channels == ["t1n", "t2w"] and mr.modality == "MR"
    assert mr.report is None and mr.report_path is None and mr.language == "en"
    assert mr.meta == {"grade": "HGG", "n": [1, 2]}
    assert ct.image == tmp_path / "ct.nii.gz" and ct.image_paths == (ct.image,)
    assert ct.n_channels == 1 and ct.channels is None and ct.modality == "CT"
    assert ct.language == "pt-BR"
    # every path of a list is checked for existence
    (tmp_path / "t2w.nii.gz").unlink()
    with pytest.raises(ManifestError) as exc:
        load_manifest(m)
    assert exc.value.errors == [f"studies.jsonl line 1: field 'image': file not found: "
                                f"{tmp_path / 't2w.nii.gz'} (study 'mr')"]


def test_new_fields_are_validated_with_line_and_field(tmp_path):
    m = _jsonl(tmp_path / "studies.jsonl", [
        {"study_id": "a", "patient_id": "p", "image": ["x.nii", "y.nii"], "channels": ["t1"]},
        {"study_id": "b", "patient_id": "p", "image": "x.nii", "language": "spanish"},
        {"study_id": "c", "patient_id": "p", "image": "x.nii", "modality": "PET"},
        {"study_id": "d", "patient_id": "p", "image": [], "meta": [1]},
        {"study_id": "e", "patient_id": "p", "image": ["x.nii", "x.nii"],
         "channels": ["t1", "t1"]},
    ])
    with pytest.raises(ManifestError) as exc:
        load_manifest(m, check_files=False)
    errs = exc.value.errors
    assert ("studies.jsonl line 1: field 'channels': 1 channel names for 2 image paths; give "
            "one name per path of 'image' (study 'a')") in errs
    assert any(e.startswith("studies.jsonl line 2: field 'language': invalid language tag "
                            "'spanish'") for e in errs)
    assert any(e.startswith("studies.jsonl line 3: field 'modality'") for e in errs)
    assert any(e.startswith("studies.jsonl line 4: field 'image': empty list") for e in errs)
    assert any(e.startswith("studies.jsonl line 4: field 'meta'") for e in errs)
    assert any("line 5: field 'image': the same path is listed twice" in e for e in errs)
    assert any("line 5: field 'channels': duplicate channel names" in e for e in errs)
    assert len(errs) == 7


def test_csv_json_cells_and_reportless_csv(tmp_path):
    m = tmp_path / "studies.csv"
    m.write_text('study_id,patient_id,image,channels,modality,language,meta\n'
                 'a,p1,"[""a.nii"", ""b.nii""]","[""t1"", ""t2""]",MR,,"{""k"": 1}"\n'
                 'b,p2,c.nii,,,es,\n', encoding="utf-8")
    a, b = load_manifest(m, check_files=False)
    assert a.image_paths == (tmp_path / "a.nii", tmp_path / "b.nii") and a.channels == ["t1", "t2"]
    assert a.modality == "MR" and a.meta == {"k": 1} and a.language == "en"
    assert b.image == tmp_path / "c.nii" and b.channels is None and b.language == "es"
    assert a.report is None and b.report is None and b.meta == {}


def test_reportless_study_prepares_and_pretraining_refuses_it(tmp_path, make_dataset):
    manifest = make_dataset(3)
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    del rows[1]["report"]
    rows[2]["language"] = "es"
    _jsonl(manifest, rows)
    prepare(manifest, tmp_path / "store", chunk=32, progress=False)
    store = VolumeStore(tmp_path / "store")
    assert [r.report is None for r in store.records] == [False, True, False]
    assert [r.language for r in store.records] == ["en", "en", "es"]
    groups = [r.group for r in store.records]
    assert len(set(groups)) == 3  # a report-less study is a group of its own
    crops = CropDataset(store, CropConfig(crop_size=(32, 32, 32), num_crops=1))
    with pytest.raises(StoreError, match=r"study 'ct_001' has no report; pre-training needs a "
                                         r"report per study"):
        PretrainDataset(crops, None, seed=0)
    ok = CropDataset(store, CropConfig(crop_size=(32, 32, 32), num_crops=1))
    ok.indices = [0, 2]
    assert len(PretrainDataset(ok, None, seed=0)) == 2
    assert StudyRecord(study_id="x", patient_id="p", image=tmp_path).report is None
