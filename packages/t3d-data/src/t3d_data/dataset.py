"""Torch datasets over a prepared store: K random crops per study, and whole volumes for eval.

``collate_crops`` builds exactly the batch of docs/architecture.md. Crop randomness depends only
on ``(seed, epoch, study index)``, so it is identical for any number of DataLoader workers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import DataLoader, Dataset

from t3d_data.crops import INTENSITY_POLICIES, CropConfig, RandCropSampler, apply_intensity
from t3d_data.errors import StoreError, StudyLoadError
from t3d_data.store import VolumeStore, _is_url

__all__ = ["CropDataset", "DataConfig", "VolumeDataset", "build_crop_loader", "collate_crops"]

logger = logging.getLogger(__name__)


def _open(store: VolumeStore | str | Path) -> VolumeStore:
    return store if isinstance(store, VolumeStore) else VolumeStore(store)


def _check_not_empty(store: VolumeStore, split: str | None, n: int, require: bool) -> None:
    """Names an empty selection (instead of torch's ``num_samples=0``): raises when ``require``,
    else warns (callers such as evaluation tools check ``len`` themselves)."""
    if n:
        return
    counts: dict[str | None, int] = {}
    for r in store.records:
        counts[r.split] = counts.get(r.split, 0) + 1
    where = f" in split '{split}'" if split is not None else ""
    have = ", ".join(f"{k if k is not None else 'no split'}: {v}" for k, v in counts.items())
    have = have or "none"
    message = (f"store {store.path} has 0 studies{where} (studies per split: {have}); prepare a "
               "manifest with studies in that split, or choose another split (data.split)")
    if require:
        raise StoreError(message)
    logger.warning("%s", message)


class CropDataset(Dataset):
    """K random crops per study of one split.

    Args:
        store: a :class:`VolumeStore` or its folder.
        crop_config: crop settings (default :class:`CropConfig`).
        split: ``"train"``/``"val"``/``"test"``, or ``None`` for all studies.
        max_studies: keep only the first N studies of the split (store order), e.g. for a
            quick demo or an overfitting check; ``None`` keeps all.
        require_studies: raise :class:`StoreError` (``store X has 0 studies in split
            'train'``) when the split is empty; otherwise that is only logged as a warning.

    Call :meth:`set_epoch` before each epoch; with DataLoader workers use
    ``persistent_workers=False`` (the default) so that workers see the new epoch.

    Each item: ``{"crops": float32 (K, 1, D, H, W) in [0, 1], "report": str, "group": int,
    "study_id": str}``.

    Raises (from ``__getitem__``):
        StudyLoadError: the study's chunks cannot be read.
    """

    def __init__(self, store: VolumeStore | str | Path, crop_config: CropConfig | None = None,
                 split: str | None = None, max_studies: int | None = None, *,
                 require_studies: bool = False):
        self.store = _open(store)
        self.config = crop_config or CropConfig()
        self.sampler = RandCropSampler.from_config(self.config)
        self.split = split
        self.indices = self.store.indices(split)
        if max_studies is not None:
            if max_studies < 1:
                raise ValueError(f"max_studies must be >= 1 or None; got {max_studies}")
            self.indices = self.indices[:max_studies]
        _check_not_empty(self.store, split, len(self.indices), require_studies)
        other = next((self.store.records[i] for i in self.indices
                      if self.store.records[i].modality != "CT"
                      or self.store.records[i].n_channels != 1), None)
        if other is not None:
            raise StoreError(
                f"store {self.store.path}: study '{other.study_id}' is {other.modality} with "
                f"{other.n_channels} channel(s); random-crop pre-training reads single-channel "
                "CT (HU) only. Fine-tune on multi-channel / MR stores with "
                "tools/finetune_seg.py (VolumeDataset, intensity zscore_foreground)")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose crops ``__getitem__`` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        i = self.indices[idx]
        rec = self.store.records[i]
        rng = np.random.default_rng([self.config.seed, self.epoch, i])
        try:
            crops = self.sampler(lambda box: self.store.read(i, box), rec.shape, rng)
        except Exception as err:  # any I/O or decode error of this one study
            raise StudyLoadError(f"study '{rec.study_id}': cannot read crops "
                                 f"({type(err).__name__}: {err})", rec.study_id) from err
        return {"crops": torch.from_numpy(crops).unsqueeze(1), "report": rec.report,
                "group": rec.group, "study_id": rec.study_id}


def collate_crops(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks CropDataset items into the batch of docs/architecture.md.

    Returns:
        ``crops`` float32 (N, 1, D, H, W); ``study_index`` long (N,) in 0..B-1; ``group`` long
        (B,); ``reports`` list[str] (B); ``study_ids`` list[str] (B).

    Raises:
        ValueError: empty batch or crops of different sizes.
    """
    if not samples:
        raise ValueError("collate_crops got an empty batch")
    sizes = {tuple(s["crops"].shape[1:]) for s in samples}
    if len(sizes) > 1:
        raise ValueError(f"all crops of a batch must have one size; got {sorted(sizes)}")
    counts = torch.tensor([s["crops"].shape[0] for s in samples])
    return {
        "crops": torch.cat([s["crops"] for s in samples]),
        "study_index": torch.repeat_interleave(torch.arange(len(samples)), counts),
        "group": torch.tensor([int(s["group"]) for s in samples], dtype=torch.long),
        "reports": [s["report"] for s in samples],
        "study_ids": [s["study_id"] for s in samples],
    }


class VolumeDataset(Dataset):
    """Whole volumes (for evaluation, e.g. sliding-window segmentation and classification).

    Args:
        store: a :class:`VolumeStore` or its folder.
        split: split to serve, or ``None`` for all.
        hu_window: HU range mapped to [0, 1] (``intensity="hu_window_linear"``).
        finding_names: order of the ``labels`` vector (default: the store's findings).
        require_studies: raise :class:`StoreError` when the split is empty (else a warning).
        intensity: the intensity policy (``t3d_models.PreprocessingConfig.intensity``):
            ``"hu_window_linear"`` (CT) or ``"zscore_foreground"`` (MRI: per channel, over
            the non-zero voxels of the whole volume, :func:`t3d_data.crops.zscore_foreground`).
            An HU window on an MR study is refused (:class:`StoreError`): MR has no HU.

    Each item: ``image`` float32 (C, X, Y, Z) (C = 1 for CT; the store's channels, e.g. 4 for
    BraTS); ``labels`` float32 (F,) with NaN where the study
    has no label for a finding; ``mask`` long (1, X, Y, Z) only when the study has one;
    ``study_id``, ``report``, ``spacing`` float32 (3,), ``affine`` float64 (4, 4).
    """

    def __init__(self, store: VolumeStore | str | Path, split: str | None = None,
                 hu_window: tuple[float, float] = (-1000.0, 1000.0),
                 finding_names: Sequence[str] | None = None, *, require_studies: bool = False,
                 intensity: str = "hu_window_linear"):
        self.store = _open(store)
        self.indices = self.store.indices(split)
        _check_not_empty(self.store, split, len(self.indices), require_studies)
        if intensity not in INTENSITY_POLICIES:
            raise ValueError(f"intensity must be one of {', '.join(INTENSITY_POLICIES)}; got "
                             f"{intensity!r}")
        mr = next((self.store.records[i] for i in self.indices
                   if self.store.records[i].modality == "MR"), None)
        if intensity == "hu_window_linear" and mr is not None:
            raise StoreError(
                f"store {self.store.path}: study '{mr.study_id}' is MR, but intensity "
                "hu_window_linear windows CT HU; use intensity='zscore_foreground' (the model's "
                "preprocessing record must say so: fine-tuning sets it with "
                "--set model.intensity=zscore_foreground)")
        self.intensity = intensity
        self.hu_window = hu_window
        self.finding_names = list(finding_names if finding_names is not None
                                  else self.store.finding_names)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        i = self.indices[idx]
        rec = self.store.records[i]
        try:
            image = apply_intensity(self.store.read(i), self.intensity, self.hu_window)
            mask = self.store.read_mask(i) if rec.has_mask else None
        except Exception as err:
            raise StudyLoadError(f"study '{rec.study_id}': cannot read volume "
                                 f"({type(err).__name__}: {err})", rec.study_id) from err
        labels = [float(rec.labels[n]) if n in rec.labels else math.nan
                  for n in self.finding_names]
        item: dict[str, Any] = {
            "image": torch.from_numpy(image if image.ndim == 4 else image[None]),
            "labels": torch.tensor(labels, dtype=torch.float32),
            "study_id": rec.study_id,
            "report": rec.report,
            "spacing": torch.tensor(rec.spacing, dtype=torch.float32),
            "affine": torch.tensor(rec.affine, dtype=torch.float64),
        }
        if mask is not None:
            item["mask"] = torch.from_numpy(mask.astype(np.int64)).unsqueeze(0)
        return item


class DataConfig(BaseModel):
    """Data settings of a training run (composed by the tools from YAML).

    Attributes:
        store: prepared store folder, or the fsspec URL of one (``s3://bucket/store``: kept as
            a string; see :class:`VolumeStore`).
        split: split to train on (``None``: all studies).
        max_studies: train on the first N studies of the split only (``None``: all); for quick
            demos and overfitting checks.
        crop: crop settings.
        batch_size: studies per batch (B); crops per batch are B·K.
        num_workers: DataLoader worker processes.
        shuffle: shuffle studies each epoch (order seeded from ``crop.seed`` and the epoch).
        drop_last: drop the last incomplete batch.
        pin_memory: pin batches for faster host-to-GPU copies.
        prefetch_factor: batches prefetched per worker (ignored without workers).
    """

    model_config = ConfigDict(extra="forbid")

    store: Path | str
    split: str | None = "train"
    max_studies: int | None = Field(None, ge=1)
    crop: CropConfig = CropConfig()
    batch_size: int = Field(2, ge=1)
    num_workers: int = Field(2, ge=0)
    shuffle: bool = True
    drop_last: bool = True
    pin_memory: bool = False
    prefetch_factor: int = Field(2, ge=1)

    @field_validator("store", mode="before")
    @classmethod
    def _url_or_path(cls, value: Any) -> Any:
        """A URL stays a string (``Path`` would fold ``s3://`` into ``s3:/``); else a path."""
        return value if _is_url(value) else Path(value) if isinstance(value, str) else value


def build_crop_loader(config: DataConfig, epoch: int = 0) -> DataLoader:
    """Builds the crop DataLoader of one epoch from a :class:`DataConfig`.

    Study order and crops are reproducible from ``(config.crop.seed, epoch)``.

    Raises:
        StoreError: the store has no studies in ``config.split`` (named, with the splits the
            store does have).
    """
    dataset = CropDataset(config.store, config.crop, split=config.split,
                          max_studies=config.max_studies, require_studies=True)
    dataset.set_epoch(epoch)
    generator = torch.Generator().manual_seed(config.crop.seed * 1_000_003 + epoch)
    return DataLoader(
        dataset, batch_size=config.batch_size, shuffle=config.shuffle, generator=generator,
        num_workers=config.num_workers, collate_fn=collate_crops, drop_last=config.drop_last,
        pin_memory=config.pin_memory,
        prefetch_factor=config.prefetch_factor if config.num_workers > 0 else None)
