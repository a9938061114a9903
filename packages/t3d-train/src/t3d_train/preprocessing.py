"""The preprocessing contract on the evaluation side: read it from the checkpoint, never assume it.

A T3D model folder records how it was pre-trained to see CT (``config.json`` →
``preprocessing``: HU window, padding, orientation, spacing, intensity policy; the crop size is
``vision.crop_size``). Evaluation and fine-tuning build their volume datasets from that record.
An explicit ``model.hu_window`` that disagrees with it is an error unless
``model.force_preprocessing=true``: scoring a model on differently scaled input is a silent,
large error otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

from t3d_train.config import ConfigError

log = logging.getLogger("t3d.preprocessing")


def resolve_preprocessing(section: Any, model_cfg: Any) -> Any:
    """The :class:`t3d_models.PreprocessingConfig` to evaluate ``model_cfg`` with.

    Args:
        section: the ``model`` section of an evaluation config (``checkpoint``, ``hu_window``,
            ``force_preprocessing``).
        model_cfg: the checkpoint's (or preset's) ``T3DModelConfig``.

    Raises:
        ConfigError: ``section.hu_window`` disagrees with the checkpoint's record and
            ``force_preprocessing`` is false.
    """
    record = model_cfg.preprocessing
    requested = getattr(section, "hu_window", None)
    if requested is None or tuple(map(float, requested)) == tuple(record.hu_window):
        return record
    source = section.checkpoint if section.checkpoint is not None else "the preset"
    if not getattr(section, "force_preprocessing", False):
        raise ConfigError(
            f"model.hu_window={list(requested)} disagrees with the window the model was "
            f"pre-trained with, {list(record.hu_window)} (recorded in {source}/config.json, "
            "preprocessing.hu_window); drop model.hu_window to use the recorded one, or set "
            "model.force_preprocessing=true to evaluate on another window anyway")
    log.warning("model.force_preprocessing: evaluating with hu_window %s instead of the recorded %s",
                list(requested), list(record.hu_window))
    return record.model_copy(update={"hu_window": tuple(map(float, requested))})


def resolve_crop_size(requested: Any, model_cfg: Any) -> tuple[int, int, int]:
    """The crop (or ROI) size to cut volumes into: ``requested``, else the model's own.

    The one place evaluation, fine-tuning and the benchmark decide the crop size; the model's is
    ``model_cfg.vision.crop_size`` (pre-training checks ``data.crop.crop_size`` against it in
    :mod:`t3d_train.pretrain_config`).
    """
    return tuple(requested or model_cfg.vision.crop_size)
