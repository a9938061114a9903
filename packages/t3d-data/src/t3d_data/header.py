"""Header values a dataset's metadata supplies when a NIfTI file's own header lacks them.

Some datasets ship NIfTI files whose header carries neither the rescale slope/intercept nor the
voxel geometry; the values are in a metadata table instead (CT-RATE: ``RescaleSlope``,
``RescaleIntercept``, ``XYSpacing``, ``ZSpacing``, ``ImagePositionPatient``,
``ImageOrientationPatient`` in ``dataset/metadata/*_metadata.csv``). An importer records them in
the manifest as ``meta["header"]`` (see docs/datasets.md); ``prepare`` reads each study inside
``with header_meta(record.meta.get("header")):`` and the NIfTI reader applies the values with
:func:`header_fallback`, the one place where that happens (outside such a block nothing
changes):

- **which files**: the metadata applies to a file whose header has no geometry of its own:
  ``qform_code`` and ``sform_code`` both 0, or voxel sizes that disagree with the metadata's
  spacing (by more than 1e-3 mm). A header whose voxel sizes match the metadata is complete (a
  file re-written with the values filled in, as CT-RATE's ``download_scripts/fix_metadata.py``
  does) and is read as it is, so HU are never scaled twice. Without a spacing in the metadata,
  only the scaling rule below decides;
- **scaling**: the metadata's slope/intercept replace the header's unless the header carries a
  non-trivial one (``scl_slope`` not 0/NaN, and not exactly slope 1 with intercept 0);
- **geometry**: the metadata's spacing and DICOM orientation/position give the affine. Array
  axis 0 runs along the DICOM row direction (``ImageOrientationPatient[:3]``), axis 1 along the
  column direction, axis 2 along their cross product (as ``fix_metadata.py`` sets them);
  missing orientation means axial ``[1, 0, 0, 0, 1, 0]``, missing position the origin.
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


def _raw_header(path: str | Path, loaded: Any) -> Any:
    """The header as stored: nibabel's loaded ``img.header`` has ``scl_slope``/``scl_inter``
    reset to NaN (the scaling moves to the data proxy), so read the file's own header."""
    import nibabel as nib
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as f:
            return type(loaded).from_fileobj(f) if hasattr(loaded, "from_fileobj") else \
                nib.Nifti1Header.from_fileobj(f)
    except Exception as err:  # nibabel raises many types on broken headers
        raise VolumeReadError(f"{path}: cannot read NIfTI header ({err}); re-export it") from err


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
    header = _raw_header(path, header)
    raw_slope, raw_inter = float(header["scl_slope"]), float(header["scl_inter"])
    explicit = not (raw_slope == 0 or math.isnan(raw_slope)) and not (
        raw_slope == 1 and (raw_inter == 0 or math.isnan(raw_inter)))
    if m.spacing is not None:
        no_codes = int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0
        zooms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
        if not (no_codes or not np.allclose(zooms, m.spacing, atol=1e-3)):
            return slope, inter, affine  # a complete header: read the file as it is
        affine = _affine(m)
    if not explicit and (m.rescale_slope is not None or m.rescale_intercept is not None):
        slope = m.rescale_slope if m.rescale_slope is not None else 1.0
        inter = m.rescale_intercept if m.rescale_intercept is not None else 0.0
    return slope, inter, affine
