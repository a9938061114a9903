"""Root test configuration: no network, ever (the Hugging Face hub is unreachable here).

Also small synthetic-data factories shared by the t3d-data tests (fixtures, so they work with
``--import-mode=importlib``).
"""

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _body_volume(shape=(40, 36, 32), seed=0) -> np.ndarray:
    """Air (-1000) with an ellipsoid 'body' (~40 HU + noise), int16."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = (grid**2).sum(0) < 0.6
    vol = np.where(inside, 40, -1000) + rng.normal(0, 10, shape)
    return np.rint(vol).astype(np.int16)


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    img.header.set_data_dtype(array.dtype)
    nib.save(img, str(path))
    return path


@pytest.fixture
def body_volume() -> Callable[..., np.ndarray]:
    return _body_volume


@pytest.fixture
def write_nifti() -> Callable[..., Path]:
    return _write_nifti


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Writes ``n`` small NIfTI studies (+ masks for even ones) and a JSONL manifest."""

    def make(n: int = 4, shape=(40, 36, 32), folder: str = "data", gz: bool = False,
             reports: list[str] | None = None) -> Path:
        root = tmp_path / folder
        root.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            vol = _body_volume(shape, seed=i)
            name = f"ct_{i:03d}.nii" + (".gz" if gz else "")
            _write_nifti(root / name, vol)
            row = {"study_id": f"ct_{i:03d}", "patient_id": f"p{i // 2}", "image": name,
                   "report": reports[i] if reports else f"Findings:  case {i % 3}.\n\nImpression: ok",
                   "labels": {"nodule": i % 2, "effusion": 0}}
            if i % 2 == 0:
                _write_nifti(root / f"mask_{i:03d}.nii.gz", (vol > 0).astype(np.uint8))
                row["mask"] = f"mask_{i:03d}.nii.gz"
            rows.append(row)
        manifest = root / "studies.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return manifest

    return make
