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
from torch import Tensor, nn

__all__ = [
    "AIR_VALUE",
    "FEATURE_KINDS",
    "CropFeatures",
    "EncoderModel",
    "crop_encoder",
    "embed_studies",
    "embed_volumes",
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


#: Crop features :func:`embed_volumes` and :class:`CropFeatures` know by name ("backbone" is an
#: alias of "pooled_tokens", the name the classification tool's config uses).
FEATURE_KINDS = ("embedding", "pooled_tokens", "backbone")


class CropFeatures(nn.Module):
    """Crops ``(N, 1, D, H, W)`` → ``(N, dim)`` features of a T3D model, as an ``nn.Module``.

    ``kind="embedding"``: ``model.encode_volume_crops`` (``proj_v`` of the pooled tokens, the
    aligned space; ``dim = model.config.embed_dim``). ``kind="pooled_tokens"`` (alias
    ``"backbone"``): the mean of the vision tower's bottleneck tokens, before any projection
    (``dim = model.vision.token_channels``). Only the ``encode_volume_crops`` of a model is
    needed for ``"embedding"`` (``dim`` is then ``None`` without ``config.embed_dim``). The
    module holds ``model``, so fine-tuning it (e.g.
    in :func:`t3d_eval.finetune_classifier`) trains the encoder.

    Raises:
        ValueError: an unknown ``kind``.
    """

    def __init__(self, model: Any, kind: str = "embedding") -> None:
        super().__init__()
        if kind not in FEATURE_KINDS:
            raise ValueError(f"features must be one of {FEATURE_KINDS}; got {kind!r}")
        self.model = model
        self.kind = "pooled_tokens" if kind == "backbone" else kind
        if self.kind == "embedding":
            dim = getattr(getattr(model, "config", None), "embed_dim", None)
        else:
            dim = model.vision.token_channels
        #: Feature width, e.g. for a linear head; ``None`` when the model does not say (a duck
        #: model with ``encode_volume_crops`` but no ``config.embed_dim``).
        self.dim: int | None = int(dim) if dim is not None else None

    def forward(self, crops: Tensor) -> Tensor:
        if self.kind == "embedding":
            return self.model.encode_volume_crops(crops)
        vision = self.model.vision
        tokens, _ = vision.tokens(vision.encode(crops, skips=False))
        return tokens.mean(1)


_MODES = ("sliding", "random", "crops")
_TENSOR_KEYS = ("labels", "group")
_LIST_KEYS = {"report": "reports", "study_id": "study_ids"}


def _recording(encode: CropEncodeFn, seen: list[Tensor]) -> CropEncodeFn:
    def fn(crops: Tensor) -> Tensor:
        out = encode(crops)
        seen.append(out)
        return out

    return fn


def _gather_rows(rows: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    if world == 1:
        return rows
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"accelerator has {world} processes but torch.distributed is not "
                           "initialised; create the Accelerator before calling embed_volumes")
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, rows)
    return [r for part in parts for r in part]


def embed_volumes(
    model: Any,
    dataset: Any,
    indices: Sequence[int] | None = None,
    *,
    crop_size: Sequence[int] | None = None,
    mode: str = "sliding",
    overlap: float = 0.25,
    num_crops: int = 4,
    seed: int = 0,
    batch_size: int = 4,
    features: str | Callable[[Tensor], Tensor] = "embedding",
    device: str | torch.device | None = None,
    accelerator: Any = None,
    keep_crops: bool = False,
    progress: bool = False,
    desc: str = "embed",
) -> dict[str, Any]:
    """Embed whole volumes of a dataset as the mean of their crops' features: the one path.

    Used by evaluation (retrieval / zero-shot), classification (linear-probe features and the
    scoring of a fine-tuned classifier) and the training-time retrieval check.

    Args:
        model: a T3D model (``encode_volume_crops``; ``vision`` for ``"pooled_tokens"``), or
            any module when ``features`` is a callable. Put in eval mode for the duration and
            restored afterwards; no gradients are computed.
        dataset: indexable; ``dataset[i]`` is a dict with ``"image"`` ``(1, X, Y, Z)`` (modes
            ``"sliding"``/``"random"``, e.g. ``t3d_data.VolumeDataset``) or ``"crops"``
            ``(K, 1, D, H, W)`` (mode ``"crops"``, e.g. ``t3d_data.CropDataset``), and
            optionally ``"labels"``, ``"group"``, ``"report"``, ``"study_id"``.
        indices: dataset positions to embed (default: all), in output order.
        crop_size: ``(D, H, W)``; required for ``"sliding"`` and ``"random"``.
        mode: ``"sliding"`` (:func:`volume_embedding_sliding`, ``overlap``), ``"random"``
            (:func:`volume_embedding_from_crops`: ``num_crops`` crops drawn from
            ``np.random.default_rng([seed, i])`` for dataset position ``i``, so the crops do
            not depend on the number of processes) or ``"crops"`` (the item's own crops).
        overlap: sliding-window overlap, in ``[0, 1)``.
        num_crops: random crops per volume.
        seed: seed of the random crop positions.
        batch_size: crops per encoder call.
        features: ``"embedding"`` or ``"pooled_tokens"`` (alias ``"backbone"``), see
            :class:`CropFeatures`, or a callable ``crops -> (N, C)`` (e.g. a fine-tuned
            ``CropClassifier``, giving the mean logit per volume).
        device: where crops are encoded (default: ``accelerator.device``, else the model's).
        accelerator: an ``accelerate.Accelerator``: the indices are sharded over its processes
            (process ``r`` takes ``indices[r::W]``) and the rows gathered back, so every process
            returns the full result in ``indices`` order.
        keep_crops: also return every crop's features (for an embedding-spread check).
        progress: a tqdm bar (main process only).
        desc: the bar's label.

    Returns:
        ``{"volume_emb": (M, C) float32 CPU, "index": (M,) long}`` plus, where the dataset items
        have them, ``"labels"`` ``(M, F)``, ``"group"`` ``(M,)`` long, ``"reports"`` and
        ``"study_ids"`` (lists); with ``keep_crops``, ``"crop_emb"`` ``(sum K, C)`` and
        ``"crop_row"`` ``(sum K,)`` (the row of each crop's volume).

    Raises:
        ValueError: an unknown mode or feature kind, no ``crop_size`` for a cropping mode, no
            indices, or an item without the key the mode needs.
    """
    from tqdm.auto import tqdm

    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}; got {mode!r}")
    if mode != "crops" and crop_size is None:
        raise ValueError(f"mode {mode!r} needs crop_size (D, H, W)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    if not order:
        raise ValueError("no volumes to embed (indices is empty)")
    encoder: Any = CropFeatures(model, features) if isinstance(features, str) else features
    rank, world = ((int(accelerator.process_index), int(accelerator.num_processes))
                   if accelerator is not None else (0, 1))
    if device is None:
        device = accelerator.device if accelerator is not None else _model_device(model)
    device = torch.device(device)

    def encode(crops: Tensor) -> Tensor:
        return encoder(crops.to(device)).detach().float().cpu()

    # The mode of every submodule, restored flag by flag afterwards (the model may sit inside
    # the encoder, e.g. CropFeatures or a CropClassifier: a recursive .train() would clobber it).
    modes = {id(m): (m, m.training) for root in (model, encoder) if isinstance(root, nn.Module)
             for m in root.modules()}
    for m, _ in modes.values():
        m.training = False
    rows: list[dict[str, Any]] = []
    try:
        with torch.no_grad():
            mine = list(enumerate(order))[rank::world]
            for pos, i in tqdm(mine, desc=desc, unit="volume", disable=not progress or rank != 0):
                sample = dataset[i]
                crop_embs = None
                if mode == "crops":
                    if "crops" not in sample:
                        raise ValueError("mode 'crops' needs items with 'crops' (K, 1, D, H, W), "
                                         "e.g. a t3d_data.CropDataset")
                    crops = torch.as_tensor(sample["crops"]).float()
                    crop_embs = torch.cat([encode(c) for c in crops.split(batch_size)])
                    emb = crop_embs.mean(0)
                else:
                    if "image" not in sample:
                        raise ValueError(f"mode {mode!r} needs items with 'image' (1, X, Y, Z), "
                                         "e.g. a t3d_data.VolumeDataset")
                    image = torch.as_tensor(sample["image"]).float()
                    seen: list[Tensor] = []
                    fn = _recording(encode, seen) if keep_crops else encode
                    if mode == "sliding":
                        emb = volume_embedding_sliding(fn, image, crop_size, overlap, batch_size)
                    else:
                        rng = np.random.default_rng([seed, i])
                        emb = volume_embedding_from_crops(fn, image, crop_size, num_crops, rng,
                                                          batch_size)
                    if keep_crops:
                        crop_embs = torch.cat(seen)
                row: dict[str, Any] = {"pos": pos, "index": i, "volume_emb": emb}
                if crop_embs is not None:
                    row["crop_emb"] = crop_embs
                for key in (*_TENSOR_KEYS, *_LIST_KEYS):
                    if key in sample:
                        row[key] = sample[key]
                rows.append(row)
    finally:
        for m, flag in modes.values():
            m.training = flag
    rows = sorted(_gather_rows(rows, world), key=lambda r: r["pos"])
    out: dict[str, Any] = {
        "volume_emb": torch.stack([r["volume_emb"] for r in rows]),
        "index": torch.tensor([r["index"] for r in rows], dtype=torch.long),
    }
    if all("labels" in r for r in rows):
        out["labels"] = torch.stack([torch.as_tensor(r["labels"]).float() for r in rows])
    if all("group" in r for r in rows):
        out["group"] = torch.tensor([int(r["group"]) for r in rows], dtype=torch.long)
    for key, name in _LIST_KEYS.items():
        if all(key in r for r in rows):
            out[name] = [r[key] for r in rows]
    if keep_crops:
        out["crop_emb"] = torch.cat([r["crop_emb"] for r in rows])
        out["crop_row"] = torch.cat([torch.full((r["crop_emb"].shape[0],), k, dtype=torch.long)
                                     for k, r in enumerate(rows)])
    return out
