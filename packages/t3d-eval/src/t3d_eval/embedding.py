"""Whole-volume and report embeddings from a crop encoder, plus thin adapters for T3D models.

A volume is embedded as the mean of its crop embeddings (docs/method.md, "Alignment": ``e_s`` =
mean of ``v_i``), from random crops or a sliding-window grid that covers the whole volume.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AIR_VALUE",
    "EncoderModel",
    "crop_encoder",
    "embed_studies",
    "sliding_window_starts",
    "text_encoder",
    "volume_embedding_from_crops",
    "volume_embedding_sliding",
]

#: Air in HU-windowed units (−1000 HU → 0.0 with the default window): the padding value.
AIR_VALUE = 0.0

CropEncodeFn = Callable[[Tensor], Tensor]
TextEncodeFn = Callable[[list[str]], Tensor]


@runtime_checkable
class EncoderModel(Protocol):
    """What the adapters need from a model (``t3d_models.T3DModel`` satisfies it).

    ``encode_volume_crops(crops (N, 1, D, H, W), study_index=None) -> (N, E)`` and
    ``encode_text(reports: list[str]) -> (B, E)``.
    """

    def encode_volume_crops(self, crops: Tensor, study_index: Tensor | None = None) -> Tensor: ...

    def encode_text(self, reports: list[str]) -> Tensor: ...


def _model_device(model: Any) -> torch.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def crop_encoder(model: EncoderModel) -> CropEncodeFn:
    """Wrap ``model.encode_volume_crops`` as a no-grad ``crops -> (N, E)`` CPU float function."""

    def encode(crops: Tensor) -> Tensor:
        with torch.no_grad():
            out = model.encode_volume_crops(crops.to(_model_device(model)))
        return out.detach().float().cpu()

    return encode


def text_encoder(model: EncoderModel) -> TextEncodeFn:
    """Wrap ``model.encode_text`` as a no-grad ``list[str] -> (B, E)`` CPU float function."""

    def encode(reports: list[str]) -> Tensor:
        with torch.no_grad():
            out = model.encode_text(list(reports))
        return out.detach().float().cpu()

    return encode


def _check_volume(volume: Tensor, crop_size: Sequence[int]) -> tuple[int, int, int]:
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise ValueError(f"volume must have shape (1, X, Y, Z); got {tuple(volume.shape)}")
    size = tuple(int(c) for c in crop_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"crop_size must be 3 positive ints; got {tuple(crop_size)}")
    return size  # type: ignore[return-value]


def _pad_to(volume: Tensor, size: Sequence[int]) -> Tensor:
    """Pad ``(1, X, Y, Z)`` at the far end of each axis with air up to at least ``size``."""
    need = [max(0, s - d) for s, d in zip(size, volume.shape[1:], strict=True)]
    if not any(need):
        return volume
    # F.pad takes the last axis first.
    pad = (0, need[2], 0, need[1], 0, need[0])
    return F.pad(volume, pad, value=AIR_VALUE)


def _encode_in_batches(encode_fn: CropEncodeFn, crops: Iterable[Tensor], batch_size: int) -> Tensor:
    total: Tensor | None = None
    count = 0
    it = iter(crops)
    while batch := list(itertools.islice(it, batch_size)):
        emb = encode_fn(torch.stack(batch)).detach().float()
        if emb.ndim != 2 or emb.shape[0] != len(batch):
            raise ValueError(
                f"encode_fn must return (N, E) for N={len(batch)} crops; got {tuple(emb.shape)}"
            )
        total = emb.sum(0) if total is None else total + emb.sum(0).to(total.device)
        count += len(batch)
    if total is None:
        raise ValueError("no crops to encode")
    return total / count


def volume_embedding_from_crops(
    encode_fn: CropEncodeFn,
    volume: Tensor,
    crop_size: Sequence[int],
    num_crops: int,
    rng: np.random.Generator | int | None = None,
    batch_size: int = 8,
) -> Tensor:
    """Mean embedding of ``num_crops`` uniformly random crops of one volume.

    Axes shorter than the crop are padded at the far end with :data:`AIR_VALUE`.

    Args:
        encode_fn: ``(N, 1, D, H, W) -> (N, E)``, e.g. :func:`crop_encoder` of a model.
        volume: ``(1, X, Y, Z)`` windowed volume.
        crop_size: ``(D, H, W)``.
        num_crops: how many crops to average (≥ 1).
        rng: numpy Generator or seed, for reproducible crop positions.
        batch_size: crops per ``encode_fn`` call.

    Returns:
        ``(E,)`` float tensor.

    Raises:
        ValueError: on a bad volume shape, crop size or ``num_crops``.
    """
    size = _check_volume(volume, crop_size)
    if num_crops < 1:
        raise ValueError(f"num_crops must be >= 1; got {num_crops}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    vol = _pad_to(volume, size)
    highs = [d - s + 1 for d, s in zip(vol.shape[1:], size, strict=True)]

    def crops() -> Iterable[Tensor]:
        for _ in range(num_crops):
            x, y, z = (int(gen.integers(0, h)) for h in highs)
            yield vol[:, x : x + size[0], y : y + size[1], z : z + size[2]]

    return _encode_in_batches(encode_fn, crops(), batch_size)


def sliding_window_starts(
    shape: Sequence[int], crop_size: Sequence[int], overlap: float = 0.25
) -> list[tuple[int, int, int]]:
    """Start corners of a crop grid that covers a volume of ``shape`` (after air padding).

    Per axis the stride is ``max(1, round(crop * (1 - overlap)))`` and the last window is
    shifted to end exactly at the border (as MONAI's ``dense_patch_slices``); an axis no longer
    than the crop gets the single start 0.

    Args:
        shape: ``(X, Y, Z)``.
        crop_size: ``(D, H, W)``.
        overlap: fraction of a crop shared with its neighbour, in ``[0, 1)``.

    Returns:
        List of ``(x, y, z)`` start corners.

    Raises:
        ValueError: if ``overlap`` is outside ``[0, 1)``.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1); got {overlap}")
    axes = []
    for d, c in zip(shape, crop_size, strict=True):
        if d <= c:
            axes.append([0])
            continue
        stride = max(1, round(c * (1.0 - overlap)))
        starts = list(range(0, d - c + 1, stride))
        if starts[-1] != d - c:
            starts.append(d - c)
        axes.append(starts)
    return list(itertools.product(*axes))


def volume_embedding_sliding(
    encode_fn: CropEncodeFn,
    volume: Tensor,
    crop_size: Sequence[int],
    overlap: float = 0.25,
    batch_size: int = 8,
) -> Tensor:
    """Mean embedding over a sliding-window grid of crops covering the whole volume.

    Axes shorter than the crop are padded at the far end with :data:`AIR_VALUE` (0.0 in
    windowed units); the grid is :func:`sliding_window_starts`, so every voxel is in some crop.

    Args:
        encode_fn: ``(N, 1, D, H, W) -> (N, E)``.
        volume: ``(1, X, Y, Z)`` windowed volume.
        crop_size: ``(D, H, W)``.
        overlap: fraction of overlap between neighbouring crops, in ``[0, 1)``.
        batch_size: crops per ``encode_fn`` call.

    Returns:
        ``(E,)`` float tensor.

    Raises:
        ValueError: on a bad volume shape, crop size or overlap.
    """
    size = _check_volume(volume, crop_size)
    vol = _pad_to(volume, size)
    starts = sliding_window_starts(vol.shape[1:], size, overlap)
    crops = (vol[:, x : x + size[0], y : y + size[1], z : z + size[2]] for x, y, z in starts)
    return _encode_in_batches(encode_fn, crops, batch_size)


def embed_studies(
    model: EncoderModel,
    samples: Iterable[dict[str, Any]],
    crop_size: Sequence[int],
    *,
    mode: str = "sliding",
    overlap: float = 0.25,
    num_crops: int = 8,
    seed: int = 0,
    volume_key: str = "image",
    report_key: str = "report",
    extra_keys: Sequence[str] = ("labels", "group", "study_id"),
    text_batch_size: int = 32,
) -> dict[str, Any]:
    """Embed every study of a dataset: volumes (crop mean) and reports, one row per study.

    Args:
        model: anything with ``encode_volume_crops`` and ``encode_text`` (:class:`EncoderModel`).
        samples: dicts with a ``(1, X, Y, Z)`` volume and a report string (e.g. a
            ``t3d_data.VolumeDataset``: ``"image"``, ``"report"``, ``"labels"``); the key names
            are arguments. The model is put in eval mode for the duration.
        crop_size: ``(D, H, W)`` the encoder was trained on.
        mode: ``"sliding"`` (:func:`volume_embedding_sliding`) or ``"random"``
            (:func:`volume_embedding_from_crops`, ``num_crops`` crops, seeded by ``seed``).
        overlap: sliding-window overlap.
        num_crops: crops per volume in ``"random"`` mode.
        seed: seed of the random crop positions.
        volume_key: sample key of the volume.
        report_key: sample key of the report text.
        extra_keys: sample keys copied into the result when present (stacked when tensors).
        text_batch_size: reports per ``encode_text`` call.

    Returns:
        ``{"volume_emb": (M, E), "report_emb": (M, E), "reports": list[str], **extras}``.

    Raises:
        ValueError: on an unknown mode or an empty dataset.
    """
    if mode not in ("sliding", "random"):
        raise ValueError(f"mode must be 'sliding' or 'random'; got {mode!r}")
    enc = crop_encoder(model)
    text_enc = text_encoder(model)
    rng = np.random.default_rng(seed)
    vols, reports = [], []
    extras: dict[str, list[Any]] = {k: [] for k in extra_keys}
    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()  # type: ignore[attr-defined]  # dropout/norm layers in eval mode
    try:
        for sample in samples:
            volume = torch.as_tensor(sample[volume_key]).float()
            if mode == "sliding":
                vols.append(volume_embedding_sliding(enc, volume, crop_size, overlap))
            else:
                vols.append(volume_embedding_from_crops(enc, volume, crop_size, num_crops, rng))
            reports.append(str(sample[report_key]))
            for k in extra_keys:
                if k in sample:
                    extras[k].append(sample[k])
        if not vols:
            raise ValueError("samples is empty")
        report_emb = torch.cat(
            [
                text_enc(reports[i : i + text_batch_size])
                for i in range(0, len(reports), text_batch_size)
            ]
        )
    finally:
        if was_training:
            model.train()  # type: ignore[attr-defined]
    out: dict[str, Any] = {
        "volume_emb": torch.stack(vols),
        "report_emb": report_emb,
        "reports": reports,
    }
    for k, values in extras.items():
        if len(values) == len(vols):
            out[k] = (
                torch.stack([torch.as_tensor(v) for v in values])
                if all(isinstance(v, Tensor | np.ndarray | int | float) for v in values)
                else values
            )
    return out
