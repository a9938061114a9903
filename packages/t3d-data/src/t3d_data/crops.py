"""Random sub-volume crops at native resolution: size checks, air rejection, padding, HU window.

T3D trains on K random crops per study instead of downsampled volumes (docs/method.md, "Data").
Argument checks follow MONAI (``RandSpatialCropSamples``): they name the dimension and the
required multiple. Randomness comes from a caller-supplied ``np.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["AIR_HU", "INTENSITY_POLICIES", "CropConfig", "RandCropSampler", "air_fraction",
           "apply_intensity", "pad_crop_box", "scale_hu_window", "zscore_foreground"]

AIR_HU = -1024
#: ``t3d_models.PreprocessingConfig.intensity``: CT HU window, MRI per-channel foreground z-score.
INTENSITY_POLICIES = ("hu_window_linear", "zscore_foreground")
Reader = Callable[[tuple[slice, slice, slice]], np.ndarray]


class CropConfig(BaseModel):
    """How crops are drawn (owned by t3d_data; composed into ``DataConfig``).

    Attributes:
        crop_size: ``(D, H, W)`` voxels along array axes (0, 1, 2); multiples of 32 (SwinUNETR).
        num_crops: K crops per study (T3D's TCL needs K >= 2 for positives; 1 allowed for eval).
        hu_window: HU range mapped linearly to [0, 1] (clipped), applied on the crop only.
        air_threshold: voxels below this HU count as air.
        max_air_fraction: crops with more air than this are re-drawn.
        max_redraws: re-draws per crop; after that the least-air candidate is kept.
        pad_value: HU used where a crop extends beyond a small volume.
        seed: base seed; crops depend only on ``(seed, epoch, study index)``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_size: tuple[int, int, int] = (96, 96, 96)
    num_crops: int = Field(4, ge=1)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    air_threshold: float = -900.0
    max_air_fraction: float = Field(0.9, ge=0.0, le=1.0)
    max_redraws: int = Field(10, ge=0)
    pad_value: int = AIR_HU
    seed: int = 0

    @field_validator("crop_size")
    @classmethod
    def _multiple_of_32(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        for dim, size in enumerate(value):
            if size <= 0 or size % 32:
                raise ValueError(f"crop size {tuple(value)} must be a multiple of 32 in every "
                                 f"dimension; got {size} in dim {dim}")
        return value

    @model_validator(mode="after")
    def _window_order(self) -> CropConfig:
        lo, hi = self.hu_window
        if not lo < hi:
            raise ValueError(f"hu_window must be (low, high) with low < high; got {self.hu_window}")
        return self


def scale_hu_window(crop: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """Maps HU linearly to [0, 1] over ``hu_window``, clipping outside (float32)."""
    lo, hi = hu_window
    out = (crop.astype(np.float32) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def zscore_foreground(image: np.ndarray) -> np.ndarray:
    """Per-channel z-score over the foreground, the MRI intensity policy (float32).

    For each channel (axis 0 of a ``(C, X, Y, Z)`` array; a 3D array is one channel), the
    foreground is its non-zero voxels (skull-stripped MRI such as BraTS has exactly 0
    outside the brain); they become ``(x - mean) / std`` with the mean and the population
    standard deviation (``ddof=0``) of that channel's foreground, and the background stays 0.
    A channel with no foreground is left at 0; one with ``std == 0`` is only centred. This is
    MONAI's ``NormalizeIntensity(nonzero=True, channel_wise=True)``, written in numpy so that
    t3d_data does not import MONAI (the tests compare the two).
    """
    arr = np.asarray(image, dtype=np.float32)
    out = np.array(arr[None] if arr.ndim == 3 else arr, dtype=np.float32)
    for channel in out:
        fg = channel != 0
        if not fg.any():
            continue
        values = channel[fg].astype(np.float64)
        std = values.std()
        channel[fg] = ((values - values.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    return out[0] if arr.ndim == 3 else out


def apply_intensity(image: np.ndarray, intensity: str = "hu_window_linear",
                    hu_window: tuple[float, float] = (-1000.0, 1000.0)) -> np.ndarray:
    """A stored image as model input under an intensity policy (float32).

    Args:
        image: ``(X, Y, Z)`` or ``(C, X, Y, Z)`` voxels as the store holds them.
        intensity: ``"hu_window_linear"`` (:func:`scale_hu_window`) or
            ``"zscore_foreground"`` (:func:`zscore_foreground`).
        hu_window: the window of ``"hu_window_linear"``.

    Raises:
        ValueError: an unknown policy.
    """
    if intensity == "hu_window_linear":
        return scale_hu_window(image, hu_window)
    if intensity == "zscore_foreground":
        return zscore_foreground(image)
    raise ValueError(f"intensity must be one of {', '.join(INTENSITY_POLICIES)}; got "
                     f"{intensity!r}")


def air_fraction(crop: np.ndarray, air_threshold: float) -> float:
    """Fraction of voxels below ``air_threshold`` HU."""
    return float(np.count_nonzero(crop < air_threshold)) / max(crop.size, 1)


def pad_crop_box(start: tuple[int, ...], size: tuple[int, ...], shape: tuple[int, ...]
                 ) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Splits a crop box that may extend beyond the volume.

    Returns:
        ``(source, target)``: slices of the volume to read, and where they go in the crop.
    """
    src, dst = [], []
    for s, n, dim in zip(start, size, shape, strict=True):
        lo, hi = max(s, 0), min(s + n, dim)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    return tuple(src), tuple(dst)


class RandCropSampler:
    """Draws K random crops (int16 HU read through ``read``) and windows them to [0, 1].

    Along each axis the crop start is uniform over the valid positions; where the volume is
    smaller than the crop, the volume lands at a random offset inside it and the rest is
    ``pad_value`` (air). A crop whose air fraction exceeds ``max_air_fraction`` is re-drawn up
    to ``max_redraws`` times; then the candidate with the least air is kept.

    Args:
        crop_size: ``(D, H, W)``, multiples of 32.
        num_crops: K.
        hu_window, air_threshold, max_air_fraction, max_redraws, pad_value: see
            :class:`CropConfig`.

    >>> vol = np.full((100, 80, 70), 40, dtype=np.int16)
    >>> s = RandCropSampler((64, 64, 64), num_crops=2)
    >>> s(lambda box: vol[box], vol.shape, np.random.default_rng(0)).shape
    (2, 64, 64, 64)
    """

    def __init__(self, crop_size: tuple[int, int, int] = (96, 96, 96), num_crops: int = 4,
                 hu_window: tuple[float, float] = (-1000.0, 1000.0), air_threshold: float = -900.0,
                 max_air_fraction: float = 0.9, max_redraws: int = 10, pad_value: int = AIR_HU):
        cfg = CropConfig(crop_size=crop_size, num_crops=num_crops, hu_window=hu_window,
                         air_threshold=air_threshold, max_air_fraction=max_air_fraction,
                         max_redraws=max_redraws, pad_value=pad_value)  # validates
        self.config = cfg
        self.crop_size = cfg.crop_size
        self.num_crops = cfg.num_crops
        self.redraws_used = 0  # statistics: total re-draws so far

    @classmethod
    def from_config(cls, config: CropConfig) -> RandCropSampler:
        """Builds a sampler from a :class:`CropConfig` (its ``seed`` is used by the dataset)."""
        return cls(config.crop_size, config.num_crops, config.hu_window, config.air_threshold,
                   config.max_air_fraction, config.max_redraws, config.pad_value)

    def draw_start(self, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, ...]:
        """Random crop origin (negative / beyond-edge where the volume is smaller)."""
        starts = []
        for dim, size in zip(shape, self.crop_size, strict=True):
            lo, hi = min(0, dim - size), max(0, dim - size)
            starts.append(int(rng.integers(lo, hi + 1)))
        return tuple(starts)

    def read_crop(self, read: Reader, shape: tuple[int, ...], start: tuple[int, ...]
                  ) -> np.ndarray:
        """Reads one int16 crop at ``start``, padding with air outside the volume."""
        src, dst = pad_crop_box(start, self.crop_size, shape)
        if all(d.start == 0 and d.stop == n for d, n in zip(dst, self.crop_size, strict=True)):
            return np.asarray(read(src), dtype=np.int16)
        crop = np.full(self.crop_size, self.config.pad_value, dtype=np.int16)
        crop[dst] = read(src)
        return crop

    def __call__(self, read: Reader, shape: tuple[int, ...], rng: np.random.Generator
                 ) -> np.ndarray:
        """Draws K crops.

        Args:
            read: returns the int16 voxels of a box ``(slice, slice, slice)`` of the volume.
            shape: the volume's shape.
            rng: the generator (seeded by the caller from seed, epoch, study index).

        Returns:
            float32 array ``(K, D, H, W)`` in [0, 1].
        """
        if len(shape) != 3:
            raise ValueError(f"expected a 3D volume shape, got {tuple(shape)}")
        cfg = self.config
        out = np.empty((self.num_crops, *self.crop_size), dtype=np.float32)
        for k in range(self.num_crops):
            best, best_air = None, 2.0
            for attempt in range(cfg.max_redraws + 1):
                crop = self.read_crop(read, shape, self.draw_start(shape, rng))
                air = air_fraction(crop, cfg.air_threshold)
                if air < best_air:
                    best, best_air = crop, air
                if air <= cfg.max_air_fraction:
                    break
                if attempt < cfg.max_redraws:
                    self.redraws_used += 1
            out[k] = scale_hu_window(best, cfg.hu_window)  # type: ignore[arg-type]
        return out
