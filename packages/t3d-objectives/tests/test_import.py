"""The package imports torch only and re-exports its public API."""

from __future__ import annotations

import subprocess
import sys

import t3d_objectives


def test_import_and_version():
    assert t3d_objectives.__version__ == "0.1.0"


def test_public_api():
    for name in t3d_objectives.__all__:
        assert hasattr(t3d_objectives, name), name
    assert "TextInformedContrastiveLoss" in t3d_objectives.__all__


def test_imports_without_monai_or_transformers():
    code = (
        "import sys, t3d_objectives; "
        "bad = sorted(m for m in ('monai', 'transformers', 'pydantic', 't3d_models', 't3d_data') "
        "if m in sys.modules); print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
