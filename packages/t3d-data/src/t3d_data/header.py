"""Header values a dataset's metadata supplies when a NIfTI file's own header lacks them.

Some datasets ship NIfTI files whose header carries neither the rescale slope/intercept nor the
voxel geometry; the values are in a metadata table instead (CT-RATE: ``RescaleSlope``,
``RescaleIntercept``, ``XYSpacing``, ``ZSpacing``, ``ImagePositionPatient``,
``ImageOrientationPatient`` in ``dataset/metadata/*_metadata.csv``). An importer records them in
the manifest as ``meta["header"]`` (see docs/datasets.md); ``prepare`` reads each study inside
``with header_meta(record.meta.get("header")):`` and the NIfTI reader applies the values with
:func:`header_fallback`, the one place where that happens (outside such a block nothing
changes):

- **scaling**: the metadata's slope/intercept replace the header's only when the header has
  none (``scl_slope`` 0 or NaN, which nibabel reads as "no scaling"); a file whose header does
  carry scaling (e.g. one re-written with the values filled in) keeps it, so HU are never
  scaled twice;
- **geometry**: the metadata's spacing and DICOM orientation/position replace the header's
  affine only when the header has none (``qform_code`` and ``sform_code`` 0) or its voxel
  sizes disagree with the metadata's spacing (more than 1e-3 mm). Array axis 0 runs along the
  DICOM row direction (``ImageOrientationPatient[:3]``), axis 1 along the column direction,
  axis 2 along their cross product (as ``download_scripts/fix_metadata.py`` of CT-RATE sets
  them); missing orientation means axial ``[1, 0, 0, 0, 1, 0]``, missing position the origin.
  DICOM LPS is converted to the RAS affine the readers use.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from t3d_data.errors import VolumeReadError

__all__ = ["HeaderMeta", "header_fallback", "header_meta"]

_CURRENT: ContextVar[Mapping[str, Any] | None] = ContextVar("t3d_header_meta", default=None)


@contextmanager
def header_meta(meta: Mapping[str, Any] | None) -> Iterator[None]:
    """Makes ``meta`` (a record's ``meta["header"]``) the fallback of the NIfTI reads inside
    the block (this thread/task only)."""
    token = _CURRENT.set(meta or None)
    try:
        yield
    finally:
        _CURRENT.reset(token)


class HeaderMeta(BaseModel):
    """``meta["header"]`` of a manifest record (every field optional).

    Attributes:
        rescale_slope: HU = slope * stored value + intercept.
        rescale_intercept: see ``rescale_slope``.
        spacing: voxel size in mm along array axes 0, 1, 2.
        orientation_lps: DICOM ImageOrientationPatient (row cosines, then column cosines).
        origin_lps: DICOM ImagePositionPatient of the first voxel, in mm.
    """

    model_config = ConfigDict(extra="forbid")

    rescale_slope: float | None = None
    rescale_intercept: float | None = None
    spacing: tuple[float, float, float] | None = None
    orientation_lps: tuple[float, float, float, float, float, float] | None = None
    origin_lps: tuple[float, float, float] | None = None


def _affine(meta: HeaderMeta) -> np.ndarray:
    o = np.asarray(meta.orientation_lps or (1, 0, 0, 0, 1, 0), dtype=np.float64)
    row, col = o[:3], o[3:]
    direction = np.stack([row, col, np.cross(row, col)], axis=1)  # columns: axes 0, 1, 2
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(meta.spacing, dtype=np.float64)
    lps[:3, 3] = meta.origin_lps or (0.0, 0.0, 0.0)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def header_fallback(path: str | Path, header: Any, slope: float, inter: float,
                    affine: np.ndarray, meta: Mapping[str, Any] | None = None
                    ) -> tuple[float, float, np.ndarray]:
    """Returns ``(slope, intercept, affine)``: the file's, or the metadata's where the file's
    header lacks them (rules in the module docstring).

    Args:
        path: the NIfTI file (for messages).
        header: its nibabel header.
        slope: the scaling nibabel found (1.0 when none).
        inter: likewise (0.0 when none).
        affine: the affine nibabel found.
        meta: the record's ``meta["header"]``; default: the one :func:`header_meta` set.

    Raises:
        VolumeReadError: ``meta["header"]`` is malformed (naming the field and the fix).
    """
    meta = meta if meta is not None else _CURRENT.get()
    if not meta:
        return slope, inter, affine
    try:
        m = HeaderMeta.model_validate(meta)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "<header>"
        raise VolumeReadError(f"{path}: manifest meta.header.{field}: {first['msg']}; fix the "
                              "importer's metadata (see docs/datasets.md)") from None
    raw_slope = float(header["scl_slope"])
    if (m.rescale_slope is not None or m.rescale_intercept is not None) and (
            raw_slope == 0 or math.isnan(raw_slope)):
        slope = m.rescale_slope if m.rescale_slope is not None else 1.0
        inter = m.rescale_intercept if m.rescale_intercept is not None else 0.0
    if m.spacing is not None:
        no_affine = int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0
        zooms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
        if no_affine or not np.allclose(zooms, m.spacing, atol=1e-3):
            affine = _affine(m)
    return slope, inter, affine
