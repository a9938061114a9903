"""t3d_train as an installed package: the scripts import it normally, importing it is cheap, one
atomic writer, one crop-size rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import t3d_train
from t3d_train.files import write_json_atomic, write_text_atomic
from t3d_train.preprocessing import resolve_crop_size

ROOT = Path(__file__).resolve().parents[1]


def test_scripts_import_t3d_train_without_path_tricks():
    for script in sorted((ROOT / "tools").glob("*.py")):
        text = script.read_text(encoding="utf-8")
        assert "sys.path.insert" not in text and "importlib" not in text, script.name


def test_importing_the_package_and_its_run_modules_does_not_import_torch():
    code = ("import sys, t3d_train, t3d_train.demo, t3d_train.evaluation, "
            "t3d_train.classification, t3d_train.segmentation, t3d_train.benchmark, "
            "t3d_train.eval_common, t3d_train.checkpoint; "
            "print(sorted(m for m in ('torch', 'monai', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


def test_init_exports_what_all_names():
    assert t3d_train.__version__
    assert all(hasattr(t3d_train, name) for name in t3d_train.__all__)


def test_atomic_write_replaces_whole_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "state.json"
    write_text_atomic(path, "old\n")
    write_json_atomic(path, {"step": 3})
    assert path.read_text(encoding="utf-8") == '{\n  "step": 3\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_crop_size_is_the_requested_one_else_the_models():
    model = SimpleNamespace(vision=SimpleNamespace(crop_size=[64, 64, 64]))
    assert resolve_crop_size(None, model) == (64, 64, 64)
    assert resolve_crop_size((32, 48, 64), model) == (32, 48, 64)
