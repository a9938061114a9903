"""Export the T3D vision tower to a plain ``monai.networks.nets.SwinUNETR``.

The backbone keeps MONAI's module names (``vision.swin.<key>``), so the export is a prefix strip:
encoder keys (``swinViT``, ``encoder1..4``, ``encoder10``) load strictly; decoder keys are
included when present and shape-compatible (``out`` only when ``out_channels`` matches).
:func:`save_swinunetr` writes the network as a folder of its own (``config.json`` with the
``SwinUNETR`` arguments and the preprocessing record, ``model.safetensors``, a ``README.md``
card). Sources may be a model, a checkpoint folder or a Hugging Face hub id.

Channel adaptation (``in_channels`` differing from the pre-trained model's, e.g. a 1-channel CT
checkpoint fine-tuned on 4 MRI sequences): the input-facing kernels (``swinViT.patch_embed.proj``,
``encoder1``'s two convolutions) are the only weights whose shape depends on the input channels;
:func:`adapt_input_channels` rebuilds them from the pre-trained ones (``"repeat"`` or
``"average"``, see there); biases and every other tensor load unchanged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import T3DModelConfig
from .vision import DECODER_MODULES, ENCODER_MODULES

if TYPE_CHECKING:
    from .model import T3DModel

__all__ = ["CHANNEL_ADAPT", "adapt_input_channels", "build_monai_swinunetr", "export_swinunetr",
           "save_swinunetr", "swinunetr_kwargs"]

logger = logging.getLogger(__name__)
_PREFIX = "vision.swin."

#: Choices of :func:`adapt_input_channels` (``build_monai_swinunetr(channel_adapt=...)``).
CHANNEL_ADAPT = ("repeat", "average")


def adapt_input_channels(weight: torch.Tensor, in_channels: int, mode: str = "repeat"
                         ) -> torch.Tensor:
    """A convolution kernel ``(out, S, *k)`` pre-trained on S input channels, for ``in_channels``.

    - ``"repeat"``: new channel ``c`` gets the kernel of source channel ``c mod S``, scaled by
      ``S / in_channels`` (timm's ``adapt_input_conv`` rule). The response to an input whose
      channels are all copies of one image equals the pre-trained response to that image (for
      S = 1: ``W / C`` per channel, summed over C copies = ``W``), so the encoder starts from
      exactly its pre-trained features on such input.
    - ``"average"``: every new channel gets the mean of the source kernels at full strength (for
      S = 1: ``W`` itself); ``C`` copies of one image give ``C`` times the pre-trained
      pre-activation, i.e. the same features up to that scale before the first normalisation.

    Args:
        weight: the pre-trained kernel; input channels on dim 1.
        in_channels: the new number of input channels C (>= 1).
        mode: one of :data:`CHANNEL_ADAPT`.

    Returns:
        A new kernel ``(out, C, *k)`` of the same dtype.

    Raises:
        ValueError: an unknown ``mode`` or ``in_channels < 1``.
    """
    if mode not in CHANNEL_ADAPT:
        raise ValueError(f"channel_adapt={mode!r} is not supported; choose one of "
                         f"{', '.join(repr(m) for m in CHANNEL_ADAPT)} (see docs/models.md, "
                         "\"Channel adaptation\")")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1; got {in_channels}")
    source = weight.shape[1]
    if mode == "average":
        mean = weight.mean(dim=1, keepdim=True)
        return mean.expand(-1, in_channels, *weight.shape[2:]).clone()
    index = torch.arange(in_channels) % source
    return weight[:, index].clone() * (source / in_channels)


def _resolve(source: T3DModel | str | os.PathLike) -> tuple[T3DModelConfig, dict[str, torch.Tensor]]:
    """Config and full state dict from a model or a checkpoint directory (no text model built)."""
    if isinstance(source, str | os.PathLike):
        from .hub import resolve_model_folder
        from .io import CONFIG_NAME, load_state_file

        root = resolve_model_folder(source)
        cfg = T3DModelConfig.from_json(str(root / CONFIG_NAME))
        return cfg, load_state_file(root)
    return source.config, {k: v.detach().cpu() for k, v in source.state_dict().items()}


def _module_of(key: str) -> str:
    return key.split(".", 1)[0]


def swinunetr_kwargs(config: T3DModelConfig) -> dict[str, Any]:
    """``SwinUNETR`` constructor arguments that match a T3D vision config (minus channels)."""
    v = config.vision
    return {
        "in_channels": v.in_channels,
        "feature_size": v.feature_size,
        "window_size": v.window_size,
        "depths": tuple(v.depths),
        "num_heads": tuple(v.num_heads),
        "use_v2": v.use_v2,
        "norm_name": v.norm_name,
    }


def export_swinunetr(
    source: T3DModel | str | os.PathLike, out_channels: int = 1, include_decoder: bool = True
) -> dict[str, torch.Tensor]:
    """State dict for ``SwinUNETR(**swinunetr_kwargs(cfg), out_channels=out_channels)``.

    Args:
        source: a :class:`T3DModel` or a checkpoint directory from ``save_pretrained``.
        out_channels: output channels of the target network (e.g. number of classes).
        include_decoder: include ``decoder5..decoder1`` (trained by TIR) when the model has
            them; ``out`` is included only when its shape matches ``out_channels`` (T3D's own
            restoration head has 1 output channel). Keys left out stay at MONAI's init.

    Returns:
        Plain SwinUNETR keys -> CPU tensors.
    """
    config, state = _resolve(source)
    exported: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not key.startswith(_PREFIX):
            continue
        sub = key[len(_PREFIX):]
        module = _module_of(sub)
        if module in ENCODER_MODULES:
            exported[sub] = tensor
        elif include_decoder and module in DECODER_MODULES:
            if module == "out" and out_channels != 1:
                continue
            exported[sub] = tensor
    missing_enc = [m for m in ENCODER_MODULES if not any(_module_of(k) == m for k in exported)]
    if missing_enc:
        raise ValueError(f"source has no weights for encoder modules {missing_enc}")
    return exported


def build_monai_swinunetr(
    source: T3DModel | str | os.PathLike,
    out_channels: int,
    include_decoder: bool = True,
    use_checkpoint: bool = False,
    return_report: bool = False,
    in_channels: int | None = None,
    channel_adapt: str = "repeat",
) -> Any:
    """Build a plain MONAI ``SwinUNETR`` initialised from a T3D model or checkpoint.

    Encoder keys must load strictly (any missing/unexpected/mismatched encoder key raises);
    every other key of the new network keeps MONAI's initialisation and is reported.

    Args:
        source: a :class:`T3DModel` or a checkpoint directory.
        out_channels: output channels (e.g. segmentation classes incl. background).
        include_decoder: also load the restoration decoder (see :func:`export_swinunetr`).
        use_checkpoint: gradient checkpointing in the new network.
        return_report: also return ``{"loaded": [...], "newly_initialised": [...],
            "adapted": [...]}`` (``adapted``: the input kernels rebuilt for ``in_channels``).
        in_channels: input channels of the new network (default: the source's, 1 for CT);
            e.g. 4 for BraTS' four MRI sequences.
        channel_adapt: how the input kernels are adapted when ``in_channels`` differs from the
            source's: ``"repeat"`` or ``"average"`` (:func:`adapt_input_channels`); any other
            value raises ``ValueError``.

    Returns:
        The ``SwinUNETR`` (and the report when ``return_report``).

    Example:
        >>> net = build_monai_swinunetr("runs/t3d/final", out_channels=14)  # doctest: +SKIP
    """
    from monai.networks.nets import SwinUNETR

    from .io import check_state_dict

    if isinstance(source, str | os.PathLike):
        from .hub import resolve_model_folder
        from .io import CONFIG_NAME

        source = resolve_model_folder(source)
        config = T3DModelConfig.from_json(str(source / CONFIG_NAME))
    else:
        config = source.config
    if channel_adapt not in CHANNEL_ADAPT:
        adapt_input_channels(torch.zeros(1, 1, 1), 1, channel_adapt)  # raises, naming the choices
    state = export_swinunetr(source, out_channels=out_channels, include_decoder=include_decoder)
    kwargs = swinunetr_kwargs(config)
    source_channels = kwargs["in_channels"]
    if in_channels is not None:
        kwargs["in_channels"] = int(in_channels)
    net = SwinUNETR(out_channels=out_channels, use_checkpoint=use_checkpoint, **kwargs)
    target = net.state_dict()
    adapted = []
    if kwargs["in_channels"] != source_channels:
        for key, tensor in list(state.items()):
            want = target.get(key)
            if (want is not None and tensor.ndim >= 3 and tensor.shape[1] == source_channels
                    and want.shape[1] == kwargs["in_channels"]
                    and tensor.shape[:1] + tensor.shape[2:] == want.shape[:1] + want.shape[2:]):
                state[key] = adapt_input_channels(tensor, kwargs["in_channels"], channel_adapt)
                adapted.append(key)
        logger.info("SwinUNETR: input kernels adapted from %d to %d channels (%s): %s",
                    source_channels, kwargs["in_channels"], channel_adapt, adapted)
    enc_target = {k: v for k, v in target.items() if _module_of(k) in ENCODER_MODULES}
    enc_state = {k: v for k, v in state.items() if _module_of(k) in ENCODER_MODULES}
    check_state_dict(enc_target, enc_state, what="exported SwinUNETR encoder")
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in state.items()
           if k not in target or tuple(v.shape) != tuple(target[k].shape)]
    if bad:
        raise ValueError(f"exported decoder keys do not fit SwinUNETR: {bad[:8]}")
    result = net.load_state_dict(state, strict=False)
    if result.unexpected_keys:  # pragma: no cover - excluded by the checks above
        raise ValueError(f"unexpected keys: {result.unexpected_keys}")
    new = sorted(result.missing_keys)
    if new:
        modules = sorted({_module_of(k) for k in new})
        logger.info("SwinUNETR: %d keys newly initialised (modules %s)", len(new), modules)
    if return_report:
        return net, {"loaded": sorted(state), "newly_initialised": new, "adapted": sorted(adapted)}
    return net


def save_swinunetr(
    source: T3DModel | str | os.PathLike,
    path: str | os.PathLike,
    out_channels: int,
    include_decoder: bool = True,
    in_channels: int | None = None,
    channel_adapt: str = "repeat",
    intensity: str | None = None,
) -> Path:
    """Write the exported ``SwinUNETR`` as a model folder of its own; returns the folder.

    Layout: ``config.json`` (``swinunetr``: the constructor arguments, ``out_channels``
    included; ``preprocessing``: the T3D model's preprocessing record; ``source``, ``preset``
    and ``newly_initialised``: the keys at MONAI's init), ``model.safetensors`` (the full state
    dict: ``SwinUNETR(**cfg["swinunetr"]).load_state_dict(...)`` loads it strictly) and
    ``README.md`` (a model card with the preprocessing record). Files are written atomically,
    ``config.json`` last. Upload with :func:`t3d_models.hub.push_to_hub`.

    Args:
        source: a :class:`T3DModel`, a checkpoint folder or a hub id.
        path: the output folder (created if needed).
        out_channels: output channels of the network (e.g. classes incl. background).
        include_decoder: also the restoration decoder (see :func:`export_swinunetr`).
        in_channels, channel_adapt: input channels and their adaptation (see
            :func:`build_monai_swinunetr`); recorded as ``channel_adapt`` in ``config.json``
            when the channels differ from the source's.
        intensity: the intensity policy the network is meant to be used with, when it differs
            from the source's record (e.g. ``"zscore_foreground"`` for an MRI fine-tune of a
            CT checkpoint); written into the record of ``config.json`` and the card.
    """
    import json

    from .card import CARD_NAME, swinunetr_card
    from .io import (
        CONFIG_NAME,
        WEIGHTS_NAME,
        _atomic_write_text,
        _state_for_saving,
        save_state_file,
    )

    if isinstance(source, str | os.PathLike):
        from .hub import resolve_model_folder

        source_name = str(source)
        source = resolve_model_folder(source)
        config = T3DModelConfig.from_json(str(Path(source) / CONFIG_NAME))
    else:
        source_name = f"T3DModel {source.config.name!r} (in memory)"
        config = source.config
    net, report = build_monai_swinunetr(source, out_channels=out_channels,
                                        include_decoder=include_decoder, return_report=True,
                                        in_channels=in_channels, channel_adapt=channel_adapt)
    if intensity is not None:
        config = config.model_copy(update={"preprocessing": config.preprocessing.model_validate(
            {**config.preprocessing.model_dump(), "intensity": intensity})})
    kwargs = {**swinunetr_kwargs(config), "out_channels": out_channels}
    if in_channels is not None:
        kwargs["in_channels"] = int(in_channels)
    kwargs = json.loads(json.dumps(kwargs))  # tuples -> lists, as config.json stores them
    meta = {"architecture": "monai.networks.nets.SwinUNETR", "swinunetr": kwargs,
            "preprocessing": config.preprocessing_record(), "source": source_name,
            "preset": config.name, "include_decoder": include_decoder,
            "newly_initialised": report["newly_initialised"]}
    if report["adapted"]:
        meta["channel_adapt"] = {"mode": channel_adapt, "keys": report["adapted"]}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_state_file(_state_for_saving(net), out / WEIGHTS_NAME)
    _atomic_write_text(out / CARD_NAME, swinunetr_card(config, kwargs, report["newly_initialised"],
                                                       source_name))
    _atomic_write_text(out / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
    return out
