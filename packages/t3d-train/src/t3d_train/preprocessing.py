"""The preprocessing contract on the evaluation side: read it from the checkpoint, never assume it.

A T3D model folder records how it was pre-trained to see CT (``config.json`` →
``preprocessing``: HU window, padding, orientation, spacing, intensity policy; the crop size is
``vision.crop_size``). Evaluation and fine-tuning build their volume datasets from that record.
An explicit ``model.hu_window`` that disagrees with it is an error unless
``model.force_preprocessing=true``: scoring a model on differently scaled input is a silent,
large error otherwise.

The intensity policy is part of the record (``preprocessing.intensity``: ``hu_window_linear``
for CT, ``zscore_foreground`` for MRI). A store of MR studies is refused for a record that
windows HU, with one exception that must be asked for: fine-tuning (``finetune=True``, e.g.
``tools/finetune_seg.py``) may set a new policy with ``model.intensity`` (``--dataset brats``
sets ``zscore_foreground``), since it trains the network on the new input; the fine-tuned
model's record then says that policy. Evaluating a frozen encoder with a policy other than its
own is an error unless ``model.force_preprocessing=true``.
"""

from __future__ import annotations

import logging
from typing import Any

from t3d_train.config import ConfigError

log = logging.getLogger("t3d.preprocessing")


def resolve_preprocessing(section: Any, model_cfg: Any, *, modality: str | None = None,
                          finetune: bool = False) -> Any:
    """The :class:`t3d_models.PreprocessingConfig` to evaluate ``model_cfg`` with.

    Args:
        section: the ``model`` section of an evaluation config (``checkpoint``, ``hu_window``,
            ``intensity``, ``force_preprocessing``).
        model_cfg: the checkpoint's (or preset's) ``T3DModelConfig``.
        modality: ``"MR"`` when the store holds MR studies (``"CT"`` or ``None``: CT).
        finetune: the caller fine-tunes the network, so ``section.intensity`` may replace the
            record's policy.

    Raises:
        ConfigError: ``section.hu_window`` disagrees with the checkpoint's record, or
            ``section.intensity`` does and this is not a fine-tune, and
            ``force_preprocessing`` is false; or MR data would be HU-windowed.
    """
    record = _resolve_intensity(section, model_cfg, modality, finetune)
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


def _resolve_intensity(section: Any, model_cfg: Any, modality: str | None, finetune: bool
                       ) -> Any:
    """The record with the intensity policy to use (see the module docstring)."""
    record = model_cfg.preprocessing
    requested = getattr(section, "intensity", None)
    force = getattr(section, "force_preprocessing", False)
    source = (f"{section.checkpoint}/config.json" if getattr(section, "checkpoint", None)
              is not None else "the preset's record")
    policy = requested or record.intensity
    if requested is not None and requested != record.intensity:
        if not finetune and not force:
            raise ConfigError(
                f"model.intensity={requested} disagrees with the policy the model was "
                f"pre-trained with, {record.intensity} (recorded in {source}, "
                "preprocessing.intensity); a frozen encoder is only comparable on its own "
                "input: drop model.intensity, or set model.force_preprocessing=true")
        log.warning("model.intensity: %s instead of the recorded %s (%s)", requested,
                    record.intensity, "fine-tuning sets the new policy" if finetune
                    else "model.force_preprocessing")
    if modality == "MR" and policy == "hu_window_linear":
        fix = ("--set model.intensity=zscore_foreground (or --dataset brats) to fine-tune on "
               "per-channel z-scored MRI" if finetune else
               "evaluate an MR-trained model, or fine-tune this one with tools/finetune_seg.py "
               "--dataset brats")
        raise ConfigError(
            f"the store holds MR studies but the model's preprocessing record ({source}) "
            f"windows CT HU (intensity {record.intensity}, hu_window {list(record.hu_window)}); "
            f"MR has no HU: {fix}")
    return record.model_copy(update={"intensity": policy}) if policy != record.intensity else record


def resolve_crop_size(requested: Any, model_cfg: Any) -> tuple[int, int, int]:
    """The crop (or ROI) size to cut volumes into: ``requested``, else the model's own.

    The one place evaluation, fine-tuning and the benchmark decide the crop size; the model's is
    ``model_cfg.vision.crop_size`` (pre-training checks ``data.crop.crop_size`` against it in
    :mod:`t3d_train.pretrain_config`).
    """
    return tuple(requested or model_cfg.vision.crop_size)
