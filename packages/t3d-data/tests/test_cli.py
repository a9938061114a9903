import json
import subprocess
import sys
import types

import pytest
from t3d_data import VolumeStore
from t3d_data.cli import main


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "t3d_data.cli", *map(str, args)],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120, **kw)


def test_help_does_not_import_torch():
    code = ("import sys\nfrom t3d_data.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'\n"
            "assert 'zarr' not in sys.modules and 'monai' not in sys.modules\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60)
    assert res.returncode == 0, res.stderr
    assert "prepare" in res.stdout and "demo" in res.stdout


def test_bad_input_prints_one_line_per_error_and_exits_2(tmp_path):
    bad = tmp_path / "studies.jsonl"
    bad.write_text('{"study_id": "a", "patient_id": "p", "image": "a.nii", "report": " "}\n'
                   '{"study_id": "b"}\n', encoding="utf-8")
    res = _cli("prepare", bad, tmp_path / "out")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    # line 2 lacks patient_id and image (report is optional: label-only studies)
    assert lines[0] == "t3d-data: error: 3 error(s) in manifest:" and len(lines) == 4
    assert all(line.startswith("t3d-data: error: studies.jsonl line ") for line in lines[1:])
    assert "studies.jsonl line 1: field 'report': empty text (study 'a')" in res.stderr
    assert "studies.jsonl line 2: field 'patient_id'" in res.stderr
    res = _cli("validate", tmp_path / "missing.jsonl")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "manifest not found" in res.stderr


def test_prepare_command_prints_summary(tmp_path, make_dataset, capsys):
    manifest = make_dataset(3)
    assert main(["prepare", str(manifest), str(tmp_path / "store"), "--chunk", "32",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "3 studies: 3 prepared, 0 skipped (unchanged), 0 quarantined" in out
    assert main(["prepare", str(manifest), str(tmp_path / "store"), "--no-progress"]) == 0
    assert "0 prepared, 3 skipped" in capsys.readouterr().out
    assert main(["validate", str(manifest)]) == 0
    assert "3 studies, 2 patients" in capsys.readouterr().out
    assert main(["prepare", str(manifest), str(tmp_path / "s2"), "--chunk", "0"]) == 2
    assert "chunk must be >= 1" in capsys.readouterr().err


def test_demo_code_path_with_fake_phantom(tmp_path, make_dataset, monkeypatch, capsys):
    calls = []

    def fake(out_dir, n_studies=24, seed=0, shape=None, progress=True):
        calls.append((out_dir, n_studies, seed, shape))
        return make_dataset(n_studies, folder="fake")

    monkeypatch.setitem(sys.modules, "t3d_data.phantom",
                        types.SimpleNamespace(generate_phantom_dataset=fake))
    assert main(["demo", str(tmp_path / "demo"), "--studies", "3", "--seed", "5",
                 "--shape", "96", "96", "64", "--no-progress"]) == 0
    assert calls == [(tmp_path / "demo" / "phantom", 3, 5, (96, 96, 64))]
    assert len(VolumeStore(tmp_path / "demo" / "store")) == 3
    assert "3 prepared" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_with_real_phantom(tmp_path):
    """End to end against the colleague's t3d_data.phantom (signature from the brief)."""
    res = _cli("demo", tmp_path, "--studies", "3", "--seed", "1", "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    store = VolumeStore(tmp_path / "store")
    assert len(store) == 3 and "3 prepared" in res.stdout
    manifest = tmp_path / "phantom" / "manifest.jsonl"
    rows = [json.loads(x) for x in manifest.read_text(encoding="utf-8").splitlines() if x.strip()]
    assert {r["study_id"] for r in rows} == {r.study_id for r in store.records}
