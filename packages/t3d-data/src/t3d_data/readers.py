"""Volume readers: NIfTI (nibabel) and DICOM series (SimpleITK) -> RAS-canonical int16 HU.

Axis convention of docs/architecture.md: array axes (0, 1, 2) run towards patient Right,
Anterior, Superior, exactly as ``nibabel.as_closest_canonical`` orders them. Sizes declared by
headers are checked against ``max_voxels`` and the file size before any voxel is allocated.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from t3d_data.errors import VolumeReadError

__all__ = ["Volume", "read_mask", "read_volume", "to_canonical"]

_INT16_MIN, _INT16_MAX = -32768, 32767
_NAN_HU = -1024  # NaN voxels (broken floats) become air


@dataclass
class Volume:
    """A CT volume in RAS canonical voxel order.

    Attributes:
        array: int16 HU, shape ``(X, Y, Z)``; axes run towards R, A, S.
        affine: 4x4 float64 voxel -> world (RAS, mm).
        spacing: voxel size in mm along the three array axes.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    s = np.linalg.norm(affine[:3, :3], axis=0)
    return float(s[0]), float(s[1]), float(s[2])


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorders voxel axes to the closest RAS orientation (what ``nib.as_closest_canonical`` does).

    Args:
        array: 3D voxel array.
        affine: its 4x4 voxel -> RAS world affine.

    Returns:
        ``(array, affine)``: a C-contiguous array and the matching affine (obliquity kept).
    """
    ornt = io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return np.ascontiguousarray(array), np.asarray(affine, dtype=np.float64)
    new_affine = affine @ inv_ornt_aff(ornt, array.shape)
    return np.ascontiguousarray(apply_orientation(array, ornt)), new_affine.astype(np.float64)


def _to_int16(raw: np.ndarray, slope: float = 1.0, inter: float = 0.0, *, integer: bool = False
              ) -> np.ndarray:
    """Applies slope/intercept slab by slab (bounded memory), rounds and clips to int16."""
    if raw.dtype == np.int16 and slope == 1 and inter == 0:
        return np.array(raw, dtype=np.int16)  # own copy: raw may be a memmap or a view
    out = np.empty(raw.shape, dtype=np.int16)
    slab_voxels = max(1, int(np.prod(raw.shape[:-1])))
    step = max(1, (1 << 24) // slab_voxels)
    for z in range(0, raw.shape[-1], step):
        slab = np.asarray(raw[..., z:z + step], dtype=np.float32)
        if slope != 1 or inter != 0:
            slab = slab * np.float32(slope) + np.float32(inter)
        np.nan_to_num(slab, copy=False, nan=_NAN_HU)
        np.clip(np.rint(slab), _INT16_MIN, _INT16_MAX, out=slab)
        out[..., z:z + step] = slab
    return out


def _check_nvox(path: Path, shape: tuple[int, ...], max_voxels: int) -> int:
    nvox = math.prod(int(s) for s in shape)
    if nvox > max_voxels:
        raise VolumeReadError(
            f"{path}: header declares {tuple(int(s) for s in shape)} = {nvox:,} voxels, more than "
            f"max_voxels={max_voxels:,}; check the header or raise max_voxels (--max-voxels)")
    return nvox


def _check_nifti_size(path: Path, img: Any, nvox: int) -> None:
    hdr = img.header
    offset = int(getattr(img.dataobj, "offset", 0) or hdr.get_data_offset())
    need = offset + nvox * hdr.get_data_dtype().itemsize
    size = path.stat().st_size
    if path.name.lower().endswith(".gz"):
        if size < 18 + 8:
            raise VolumeReadError(f"{path}: truncated gzip file ({size} bytes); re-export it")
        with path.open("rb") as f:
            f.seek(-4, 2)
            isize = struct.unpack("<I", f.read(4))[0]
        if isize != need % 2**32:
            raise VolumeReadError(
                f"{path}: the header implies {need:,} uncompressed bytes but the gzip trailer "
                f"says {isize:,} (mod 2^32): the file is truncated or its header lies about the "
                "dimensions/datatype; re-export it")
    elif size != need:
        what = "truncated" if size < need else "longer than its header declares"
        raise VolumeReadError(
            f"{path}: file is {what}: header (shape {img.shape}, {hdr.get_data_dtype()}, "
            f"vox_offset {offset}) implies {need:,} bytes, file has {size:,}; re-export it or fix "
            "the header")


def _load_nifti(path: Path, max_voxels: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Returns (raw array, affine, slope, intercept) after the size checks."""
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types on broken headers
        raise VolumeReadError(f"{path}: cannot read NIfTI header ({err}); re-export it") from err
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise VolumeReadError(f"{path}: expected a 3D volume, header declares shape {img.shape}")
    nvox = _check_nvox(path, shape, max_voxels)
    _check_nifti_size(path, img, nvox)
    proxy = img.dataobj
    try:
        raw = np.asanyarray(proxy.get_unscaled()).reshape(shape)
    except Exception as err:  # EOFError, zlib.error, OSError, ValueError
        raise VolumeReadError(f"{path}: cannot read voxel data ({type(err).__name__}: {err}); "
                              "the file is truncated or corrupt, re-export it") from err
    slope = float(getattr(proxy, "slope", 1.0))
    inter = float(getattr(proxy, "inter", 0.0))
    return raw, np.asarray(img.affine, dtype=np.float64), slope, inter


def _read_dicom(folder: Path, max_voxels: int, series_uid: str | None
                ) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    ids = list(reader.GetGDCMSeriesIDs(str(folder)))
    if not ids:
        raise VolumeReadError(f"{folder}: no DICOM series found in this folder")
    if series_uid is None:
        if len(ids) > 1:
            raise VolumeReadError(
                f"{folder}: {len(ids)} DICOM series in one folder ({', '.join(ids)}); choose one "
                "with series_uid= (manifest: one folder per series)")
        series_uid = ids[0]
    elif series_uid not in ids:
        raise VolumeReadError(f"{folder}: series '{series_uid}' not found; found {', '.join(ids)}")
    files = list(reader.GetGDCMSeriesFileNames(str(folder), series_uid))
    try:
        info = sitk.ImageFileReader()
        info.SetFileName(files[0])
        info.ReadImageInformation()
        size = info.GetSize()
    except RuntimeError as err:
        raise VolumeReadError(f"{files[0]}: cannot read DICOM header ({err})") from err
    shape = (size[0], size[1], len(files) * (size[2] if len(size) > 2 else 1))
    _check_nvox(folder, shape, max_voxels)
    reader.SetFileNames(files)
    try:
        image = reader.Execute()  # sorted by position; applies rescale slope/intercept
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
        raise VolumeReadError(f"{folder}: cannot read DICOM series '{series_uid}' ({first}); "
                              "a slice is truncated or corrupt") from err
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeReadError(f"{folder}: expected a 3D scalar series")
    array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)  # (z,y,x) -> (x,y,z)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    lps[:3, 3] = image.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return _to_int16(array), ras


def read_volume(path: str | Path, max_voxels: int = 2**31, *, series_uid: str | None = None
                ) -> Volume:
    """Reads a CT volume as RAS-canonical int16 HU.

    Args:
        path: ``.nii``/``.nii.gz`` file, or a folder holding a DICOM series.
        max_voxels: refuse larger volumes (checked on the header, before allocating).
        series_uid: DICOM SeriesInstanceUID to read when the folder holds several series.

    Returns:
        The volume with its RAS affine and spacing (slope/intercept applied, HU rounded and
        clipped to the int16 range, NaN -> -1024).

    Raises:
        VolumeReadError: missing, truncated or inconsistent file, too many voxels, several
            DICOM series and none chosen; the message names the file and the fix.
    """
    path = Path(path)
    if path.is_dir():
        array, affine = _read_dicom(path, max_voxels, series_uid)
    elif path.is_file():
        if not path.name.lower().endswith((".nii", ".nii.gz")):
            raise VolumeReadError(f"{path}: unsupported image format; give a .nii/.nii.gz file "
                                  "or a DICOM series folder")
        raw, affine, slope, inter = _load_nifti(path, max_voxels)
        array = _to_int16(raw, slope, inter)
    else:
        raise VolumeReadError(f"{path}: image not found")
    array, affine = to_canonical(array, affine)
    return Volume(array=array, affine=affine, spacing=_spacing(affine))


def read_mask(path: str | Path, max_voxels: int = 2**31) -> Volume:
    """Reads a NIfTI label map, reoriented exactly like :func:`read_volume`.

    Args:
        path: ``.nii``/``.nii.gz`` label map.
        max_voxels: refuse larger maps before allocating.

    Returns:
        A :class:`Volume` whose ``array`` is uint8 when the labels fit in 0..255, else int16.

    Raises:
        VolumeReadError: as for :func:`read_volume`.
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeReadError(f"{path}: mask not found")
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise VolumeReadError(f"{path}: masks must be .nii/.nii.gz label maps")
    raw, affine, slope, inter = _load_nifti(path, max_voxels)
    labels = _to_int16(raw, slope, inter)
    if labels.size and labels.min() >= 0 and labels.max() <= 255:
        labels = labels.astype(np.uint8)
    labels, affine = to_canonical(labels, affine)
    return Volume(array=labels, affine=affine, spacing=_spacing(affine))
