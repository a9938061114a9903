"""Root test configuration: no network, ever (the Hugging Face hub is unreachable here)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest


@pytest.fixture(scope="session")
def phantom_store(tmp_path_factory):
    """Builds a prepared phantom store: ``phantom_store(n_studies, shape=None, seed=3) -> STORE``.

    Shared by the tool tests' module-scoped ``store`` fixtures (each picks its own size).
    """

    def build(n_studies: int, shape: tuple[int, int, int] | None = None, seed: int = 3):
        from t3d_data import prepare
        from t3d_data.phantom import generate_phantom_dataset

        root = tmp_path_factory.mktemp("phantom")
        manifest = generate_phantom_dataset(root / "raw", n_studies=n_studies, seed=seed,
                                            shape=shape, progress=False)
        prepare(manifest, root / "store", progress=False)
        return root / "store"

    return build
