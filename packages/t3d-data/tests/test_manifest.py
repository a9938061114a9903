import json

import pytest
from t3d_data import ManifestError, StudyRecord, load_manifest, patient_split


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_resolves_paths_and_parses(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "r.txt").write_text("report", encoding="utf-8")
    m = _jsonl(tmp_path / "studies.jsonl", [
        {"study_id": "a", "patient_id": "p", "image": "a.nii.gz", "report": "r.txt",
         "split": "train", "labels": {"nodule": 1}},
    ])
    (rec,) = load_manifest(m)
    assert rec.image == tmp_path / "a.nii.gz" and rec.report_path == tmp_path / "r.txt"
    assert rec.labels == {"nodule": 1} and rec.split == "train" and rec.mask is None


def test_all_errors_listed_with_file_line_field(tmp_path):
    m = _jsonl(tmp_path / "studies.jsonl", [
        {"study_id": "ct_0001", "patient_id": "p1", "image": "a.nii", "report": "ok"},
        {"study_id": "ct_0042", "patient_id": "p2", "image": "b.nii", "report": "  \n "},
        "{not json",
        {"study_id": "ct_0001", "patient_id": "p3", "image": "c.nii", "report": "dup"},
        {"study_id": "ct_5", "patient_id": "p3", "image": "c.nii", "report": "x", "split": "dev",
         "labels": {"nodule": 2}, "colour": "red"},
        {"study_id": "ct_6", "image": "d.nii", "report": "x"},
    ])
    with pytest.raises(ManifestError) as exc:
        load_manifest(m, check_files=False)
    errs = exc.value.errors
    assert "studies.jsonl line 2: field 'report': empty text (study 'ct_0042')" in errs
    assert any(e.startswith("studies.jsonl line 3: invalid JSON") for e in errs)
    assert "studies.jsonl line 4: field 'study_id': duplicate of line 1 (study 'ct_0001')" in errs
    line5 = [e for e in errs if "line 5" in e]
    assert {"'split'", "'labels'", "'colour'"} <= {e.split("field ")[1].split(":")[0] for e in line5}
    assert any("line 6: field 'patient_id': required field is missing" in e for e in errs)
    assert len(errs) == 7
    # missing files are reported too when checked
    with pytest.raises(ManifestError, match="line 1: field 'image': file not found"):
        load_manifest(_jsonl(tmp_path / "one.jsonl", [
            {"study_id": "a", "patient_id": "p", "image": "nope.nii", "report": "x"}]))


def test_csv_labels_json_column_and_line_numbers(tmp_path):
    m = tmp_path / "studies.csv"
    m.write_text('study_id,patient_id,image,report,split,labels,mask\n'
                 'a,p1,a.nii,"Findings: x",train,"{""nodule"": 1}",\n'
                 'b,p2,b.nii,"Findings: y",,,m.nii\n'
                 'c,p3,c.nii,"",,"{bad",\n', encoding="utf-8")
    with pytest.raises(ManifestError) as exc:
        load_manifest(m, check_files=False)
    assert exc.value.errors == [
        "studies.csv line 4: field 'report': empty text (study 'c')",
        "studies.csv line 4: field 'labels': invalid JSON (Expecting property name enclosed in "
        "double quotes) (study 'c')"]
    m.write_text(m.read_text(encoding="utf-8").rsplit("c,p3", 1)[0])
    a, b = load_manifest(m, check_files=False)
    assert a.labels == {"nodule": 1} and b.labels == {} and b.mask == tmp_path / "m.nii"
    assert b.split is None


def test_patient_split_is_patient_level_and_keeps_existing(tmp_path):
    recs = [StudyRecord(study_id=f"s{i}", patient_id=f"p{i % 37}", image=tmp_path / "x.nii",
                        report="r", split="test" if i % 37 == 5 else None) for i in range(200)]
    out = patient_split(recs, seed=3)
    by_patient: dict[str, set[str]] = {}
    for r in out:
        by_patient.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in by_patient.values())
    assert by_patient["p5"] == {"test"}
    counts = {s: sum(1 for v in by_patient.values() if v == {s}) for s in ("train", "val", "test")}
    assert sum(counts.values()) == 37
    for split, frac in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(counts[split] - frac * 37) < 1  # 29.6 / 3.7 / 3.7
    assert patient_split(recs, seed=3) == out
    with pytest.raises(ValueError, match="sum to 1"):
        patient_split(recs, {"train": 0.5, "val": 0.1})
    bad = [*recs, recs[0].model_copy(update={"study_id": "z", "split": "val", "patient_id": "p5"})]
    with pytest.raises(ValueError, match="patient 'p5'"):
        patient_split(bad)
