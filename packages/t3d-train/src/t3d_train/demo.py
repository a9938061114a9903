"""The embedded CPU demo of pre-training: its defaults, its phantom data, and config loading.

``python tools/pretrain.py`` without ``--config`` runs :data:`DEMO_DEFAULTS` on a phantom store
built once into ``$T3D_CACHE_DIR`` (default ``~/.cache/t3d``) by :func:`ensure_demo_store`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from t3d_train.config import load_config

DEMO_STUDIES = 96  # the phantom's patient-level split leaves 20 of them held out ("test")
# 96^3 phantoms: two random 64^3 crops of a study overlap, so TCL's positives share voxels and
# the contrastive terms can fall within the demo's minutes (native-size phantoms, ~128x128x112,
# did not in 20 steps; see docs/pretraining.md)
DEMO_SHAPE = (96, 96, 96)
DEMO_DEFAULTS: dict[str, Any] = {
    # The embedded default: the t3d-tiny-cpu model on a small phantom dataset, ~8 min on 2 quiet
    # cores (~14 s per step of 4 studies x 2 crops of 64^3). It trains on the first 4 training
    # studies only (an overfitting check: with 16 studies, or native-size phantoms, the
    # contrastive terms did not fall within 30 steps) and evaluates on all 20 held-out ones.
    # lr is the heads' learning rate; the encoders learn at 0.1x (optim.vision_lr_mult / text_lr_mult).
    "data": {"store": None, "batch_size": 4, "num_workers": 0, "max_studies": 4,
             "crop": {"num_crops": 2}},
    "model": {"preset": "t3d-tiny-cpu"},
    "optim": {"lr": 1e-3, "warmup_steps": 3, "max_steps": 30},
    # One resumable checkpoint (~330 MB: weights + AdamW state); --set run.keep_last=N keeps more.
    "run": {"output_dir": "runs/demo", "checkpoint_every": 30, "keep_last": 1, "eval_crops": 2},
}
#: ``data.store`` of the demo until :func:`ensure_demo_store` replaces it with the real folder.
DEMO_STORE = "<demo>"


def demo_cache_dir() -> Path:
    """Where the demo's phantom data is cached (``$T3D_CACHE_DIR`` or ``~/.cache/t3d``)."""
    return Path(os.environ.get("T3D_CACHE_DIR", Path.home() / ".cache" / "t3d"))


def ensure_demo_store(n_studies: int = DEMO_STUDIES, seed: int = 0,
                      shape: tuple[int, int, int] | None = DEMO_SHAPE) -> Path:
    """Build (once) the phantom dataset and prepare it into a store; return the store folder."""
    from t3d_data import prepare
    from t3d_data.phantom import generate_phantom_dataset

    tag = "" if shape is None else "-" + "x".join(map(str, shape))
    root = demo_cache_dir() / f"phantom-n{n_studies}{tag}-s{seed}"
    store = root / "store"
    if not (store / "index.json").is_file() or not (root / "manifest.ok").is_file():
        manifest = generate_phantom_dataset(root / "phantom", n_studies=n_studies, seed=seed,
                                            shape=shape)
        prepare(manifest, store)
        (root / "manifest.ok").write_text("ok\n", encoding="utf-8")
    return store


def load_pretrain_config(config: Path | None, overrides: list[str]):
    """The validated :class:`~t3d_train.pretrain_config.PretrainConfig` of ``--config`` and
    ``--set`` overrides; :data:`DEMO_DEFAULTS` when ``config`` is None (``data.store`` is then
    :data:`DEMO_STORE` unless overridden)."""
    from t3d_train.pretrain_config import PretrainConfig

    if config is None:
        defaults = json.loads(json.dumps(DEMO_DEFAULTS))
        overridden = {o.split("=", 1)[0].strip() for o in overrides}
        if "data.store" not in overridden:
            defaults["data"]["store"] = DEMO_STORE
        return load_config(PretrainConfig, None, overrides, defaults=defaults)
    return load_config(PretrainConfig, config, overrides)
