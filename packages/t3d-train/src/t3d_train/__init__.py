"""t3d_train: the glue of the launch scripts in tools/ (configs, the pre-training loop, runs).

Configs from YAML + ``--set`` overrides (:mod:`t3d_train.config`, :mod:`~t3d_train.pretrain_config`,
:mod:`~t3d_train.eval_config`); the Accelerate pre-training loop (:mod:`~t3d_train.loop` over
``t3d_data``'s ``PretrainDataset`` and ``EpochShuffleSampler``,
:mod:`~t3d_train.schedule`, :mod:`~t3d_train.trainer`), atomic, resumable
checkpoints (:mod:`~t3d_train.checkpoint`, :mod:`~t3d_train.files`); the demo data
(:mod:`~t3d_train.demo`); evaluation runs (:mod:`~t3d_train.evaluation`,
:mod:`~t3d_train.classification`, :mod:`~t3d_train.segmentation`). No model math lives here:
models, losses and metrics come from t3d_models, t3d_objectives and t3d_eval.

Importing the package (and its config modules) does not import torch, so a config error is
reported in a second; the modules that need torch import it themselves. See the README.
"""

from __future__ import annotations

from t3d_train.config import ConfigError, load_config, run_cli
from t3d_train.files import write_bytes_atomic, write_json_atomic, write_text_atomic

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "load_config",
    "run_cli",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]
