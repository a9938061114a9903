"""`pip install ./packages/t3d-data` into a fresh venv works (uv; ~10 s with a warm uv cache)."""

import shutil
import subprocess
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("uv") is None, reason="needs the uv executable")
def test_install_into_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(["uv", "venv", "-q", str(venv)], check=True, timeout=60)
    subprocess.run(["uv", "pip", "install", "-q", "--python", str(venv), str(PACKAGE)],
                   check=True, timeout=180)
    code = ("import sys, t3d_data\n"
            "from t3d_data import CropDataset, VolumeStore, prepare, collate_crops\n"
            "assert 'monai' not in sys.modules\nprint(t3d_data.__version__)")
    res = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                         text=True, encoding="utf-8", errors="replace", timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "0.1.0", res.stderr
    res = subprocess.run([str(venv / "bin" / "t3d-data"), "--help"], capture_output=True,
                         text=True, encoding="utf-8", errors="replace", timeout=60)
    assert res.returncode == 0 and "prepare" in res.stdout
