"""Volume readers: NIfTI (nibabel) and DICOM series (SimpleITK) -> RAS-canonical int16 HU.

Axis convention of docs/architecture.md: array axes (0, 1, 2) run towards patient Right,
Anterior, Superior, exactly as ``nibabel.as_closest_canonical`` orders them. Sizes declared by
headers are checked against ``max_voxels``, ``max_bytes`` (voxels x datatype size) and the file
size before any voxel is allocated; ``.nii.gz`` voxels are decompressed as a bounded stream that
stops at the bytes the header implies, so a forged gzip trailer costs no memory.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
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
DEFAULT_MAX_VOXELS = 2**31
DEFAULT_MAX_BYTES = 2**32  # decoded voxel bytes a header may declare (4 GiB)
_SLAB_BYTES = 1 << 24  # bytes decompressed and converted at a time
_READ_PIECE = 1 << 24


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
        slab = np.array(raw[..., z:z + step], dtype=np.float32)  # own, writable copy
        if slope != 1 or inter != 0:
            slab = slab * np.float32(slope) + np.float32(inter)
        np.nan_to_num(slab, copy=False, nan=_NAN_HU)
        np.clip(np.rint(slab), _INT16_MIN, _INT16_MAX, out=slab)
        out[..., z:z + step] = slab
    return out


def _check_budget(path: Path, shape: tuple[int, ...], itemsize: int, dtype_name: str,
                  max_voxels: int, max_bytes: int) -> int:
    """Checks the voxels and the decoded bytes a header declares; returns the bytes."""
    dims = tuple(int(s) for s in shape)
    nvox = math.prod(dims)
    if nvox > max_voxels:
        raise VolumeReadError(
            f"{path}: header declares {dims} = {nvox:,} voxels, more than "
            f"max_voxels={max_voxels:,}; check the header or raise max_voxels (--max-voxels)")
    nbytes = nvox * itemsize
    if nbytes > max_bytes:
        raise VolumeReadError(
            f"{path}: header declares {dims} {dtype_name} = {nvox:,} voxels x {itemsize} bytes = "
            f"{nbytes:,} bytes, more than max_bytes={max_bytes:,}; check the header or raise "
            "max_bytes (--max-bytes)")
    return nbytes


def _check_gzip_trailer(path: Path, need: int) -> None:
    """Cheap early check: the gzip length trailer must match the header (mod 2**32). A forged
    trailer passes it; :func:`_read_gz_voxels` is the real, streaming check."""
    size = path.stat().st_size
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


def _read_exact(f: Any, n: int) -> bytes:
    """Up to ``n`` bytes of a stream, read in bounded pieces (fewer only at the end)."""
    parts, got = [], 0
    while got < n:
        piece = f.read(min(_READ_PIECE, n - got))
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _read_gz_voxels(path: Path, shape: tuple[int, int, int], dtype: np.dtype, offset: int,
                    slope: float, inter: float) -> np.ndarray:
    """Decompresses a .nii.gz's voxels slab by slab (bounded memory) into int16 HU.

    Never decompresses more than the header implies, and allocates the output only once the
    stream has produced a first full slab, so a forged header costs no memory. Voxel data is
    Fortran-ordered, so each contiguous run of bytes is a slab of whole z-planes.
    """
    x, y, z = shape
    plane = x * y * dtype.itemsize
    step = max(1, _SLAB_BYTES // max(plane, 1))
    need = offset + plane * z
    out: np.ndarray | None = None
    done = 0
    try:
        with gzip.open(path, "rb") as f:
            done = len(_read_exact(f, offset))
            for z0 in range(0, z, step):
                k = min(step, z - z0)
                data = _read_exact(f, plane * k)
                done += len(data)
                if len(data) < plane * k:
                    break
                raw = np.frombuffer(data, dtype=dtype).reshape((x, y, k), order="F")
                if out is None:
                    out = np.empty(shape, dtype=np.int16)
                out[..., z0:z0 + k] = _to_int16(raw, slope, inter)
            extra = len(f.read(1)) if done == need else 0
    except (EOFError, OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise VolumeReadError(f"{path}: cannot read voxel data ({type(err).__name__}: {err}); "
                              "the file is truncated or corrupt, re-export it") from err
    if done < need:
        raise VolumeReadError(
            f"{path}: truncated: the header (shape {shape}, {dtype}, vox_offset {offset}) implies "
            f"{need:,} uncompressed bytes but the data ends after {done:,}; the file is "
            "truncated or its header lies about the dimensions/datatype; re-export it")
    if extra:
        raise VolumeReadError(
            f"{path}: longer than its header declares (shape {shape}, {dtype}, vox_offset "
            f"{offset} imply {need:,} uncompressed bytes); re-export it or fix the header")
    return out if out is not None else np.empty(shape, dtype=np.int16)


def _load_nifti(path: Path, max_voxels: int, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (int16 array with slope/intercept applied, affine) after the budget checks."""
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types on broken headers
        raise VolumeReadError(f"{path}: cannot read NIfTI header ({err}); re-export it") from err
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise VolumeReadError(f"{path}: expected a 3D volume, header declares shape {img.shape}")
    hdr = img.header
    dtype = hdr.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise VolumeReadError(f"{path}: unsupported NIfTI datatype {dtype}; expected a scalar "
                              "integer or float volume")
    nbytes = _check_budget(path, shape, dtype.itemsize, str(dtype), max_voxels, max_bytes)
    proxy = img.dataobj
    offset = int(getattr(proxy, "offset", 0) or hdr.get_data_offset())
    slope = float(getattr(proxy, "slope", 1.0))
    inter = float(getattr(proxy, "inter", 0.0))
    affine = np.asarray(img.affine, dtype=np.float64)
    if path.name.lower().endswith(".gz"):
        _check_gzip_trailer(path, offset + nbytes)
        return _read_gz_voxels(path, shape, dtype, offset, slope, inter), affine  # type: ignore[arg-type]
    size = path.stat().st_size
    if size != offset + nbytes:
        what = "truncated" if size < offset + nbytes else "longer than its header declares"
        raise VolumeReadError(
            f"{path}: file is {what}: header (shape {img.shape}, {dtype}, vox_offset {offset}) "
            f"implies {offset + nbytes:,} bytes, file has {size:,}; re-export it or fix the "
            "header")
    try:
        raw = np.asanyarray(proxy.get_unscaled()).reshape(shape)  # a memmap: reads lazily
    except Exception as err:  # OSError, ValueError
        raise VolumeReadError(f"{path}: cannot read voxel data ({type(err).__name__}: {err}); "
                              "the file is truncated or corrupt, re-export it") from err
    return _to_int16(raw, slope, inter), affine


def _read_dicom(folder: Path, max_voxels: int, max_bytes: int, series_uid: str | None
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
        pixel = sitk.Image([1] * len(size), info.GetPixelID(), info.GetNumberOfComponents())
        itemsize = pixel.GetSizeOfPixelComponent() * pixel.GetNumberOfComponentsPerPixel()
        pixel_name = pixel.GetPixelIDTypeAsString()
    except RuntimeError as err:
        raise VolumeReadError(f"{files[0]}: cannot read DICOM header ({err})") from err
    shape = (size[0], size[1], len(files) * (size[2] if len(size) > 2 else 1))
    _check_budget(folder, shape, itemsize, pixel_name, max_voxels, max_bytes)
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


def read_volume(path: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS, *,
                max_bytes: int = DEFAULT_MAX_BYTES, series_uid: str | None = None) -> Volume:
    """Reads a CT volume as RAS-canonical int16 HU.

    Args:
        path: ``.nii``/``.nii.gz`` file, or a folder holding a DICOM series.
        max_voxels: refuse larger volumes (checked on the header, before allocating).
        max_bytes: refuse volumes whose header declares more decoded voxel bytes (voxels x the
            stored datatype's size; checked before allocating).
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
        array, affine = _read_dicom(path, max_voxels, max_bytes, series_uid)
    elif path.is_file():
        if not path.name.lower().endswith((".nii", ".nii.gz")):
            raise VolumeReadError(f"{path}: unsupported image format; give a .nii/.nii.gz file "
                                  "or a DICOM series folder")
        array, affine = _load_nifti(path, max_voxels, max_bytes)
    else:
        raise VolumeReadError(f"{path}: image not found")
    array, affine = to_canonical(array, affine)
    return Volume(array=array, affine=affine, spacing=_spacing(affine))


def read_mask(path: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS, *,
              max_bytes: int = DEFAULT_MAX_BYTES) -> Volume:
    """Reads a NIfTI label map, reoriented exactly like :func:`read_volume`.

    Args:
        path: ``.nii``/``.nii.gz`` label map.
        max_voxels: refuse larger maps before allocating.
        max_bytes: refuse maps whose header declares more decoded bytes.

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
    labels, affine = _load_nifti(path, max_voxels, max_bytes)
    if labels.size and labels.min() >= 0 and labels.max() <= 255:
        labels = labels.astype(np.uint8)
    labels, affine = to_canonical(labels, affine)
    return Volume(array=labels, affine=affine, spacing=_spacing(affine))
