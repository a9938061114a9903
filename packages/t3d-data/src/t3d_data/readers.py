"""Volume readers: NIfTI (nibabel) and DICOM series (SimpleITK) -> RAS-canonical arrays.

CT is read as int16 HU; MR (``modality="MR"``) as float32 with the header's slope/intercept
applied and no HU conversion (MR intensities have no absolute unit; the model normalises them
per channel, see ``t3d_models.PreprocessingConfig.intensity``). :func:`read_image` also reads
multi-channel images: a list of 3D files stacked as channels after checking that they share one
voxel grid, or one 4D NIfTI with the channels last (as MSD Task01's ``imagesTr``); channels come
first in the array, ``(C, X, Y, Z)``.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from t3d_data.errors import VolumeReadError
from t3d_data.header import header_fallback

__all__ = ["Volume", "read_image", "read_mask", "read_volume", "to_canonical"]

_INT16_MIN, _INT16_MAX = -32768, 32767
_NAN_HU = -1024  # NaN voxels (broken floats) become air
_GRID_ATOL = 1e-3  # mm: channels (and masks) whose affines differ by more are not one grid
DEFAULT_MAX_VOXELS = 2**31
DEFAULT_MAX_BYTES = 2**32  # decoded voxel bytes a header may declare (4 GiB)
_SLAB_BYTES = 1 << 24  # bytes decompressed and converted at a time
_READ_PIECE = 1 << 24


@dataclass
class Volume:
    """A volume in RAS canonical voxel order.

    Attributes:
        array: int16 HU (CT) or float32 (MR), shape ``(X, Y, Z)``, or ``(C, X, Y, Z)`` for a
            multi-channel image (:func:`read_image`); spatial axes run towards R, A, S.
        affine: 4x4 float64 voxel -> world (RAS, mm).
        spacing: voxel size in mm along the three spatial axes.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]

    @property
    def n_channels(self) -> int:
        """Channels: ``array.shape[0]`` for a 4D array, else 1."""
        return int(self.array.shape[0]) if self.array.ndim == 4 else 1

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """``(X, Y, Z)``."""
        return tuple(int(s) for s in self.array.shape[-3:])  # type: ignore[return-value]


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    s = np.linalg.norm(affine[:3, :3], axis=0)
    return float(s[0]), float(s[1]), float(s[2])


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorders voxel axes to the closest RAS orientation (what ``nib.as_closest_canonical`` does).

    Args:
        array: voxel array; its first three axes are spatial (a 4th, channels last, is kept).
        affine: its 4x4 voxel -> RAS world affine.

    Returns:
        ``(array, affine)``: a C-contiguous array and the matching affine (obliquity kept).
    """
    ornt = io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return np.ascontiguousarray(array), np.asarray(affine, dtype=np.float64)
    new_affine = affine @ inv_ornt_aff(ornt, array.shape[:3])
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


def _to_float32(raw: np.ndarray, slope: float = 1.0, inter: float = 0.0) -> np.ndarray:
    """Applies slope/intercept slab by slab into float32; non-finite voxels become 0 (MR
    background)."""
    out = np.empty(raw.shape, dtype=np.float32)
    slab_voxels = max(1, int(np.prod(raw.shape[:-1])))
    step = max(1, (1 << 24) // slab_voxels)
    for z in range(0, raw.shape[-1], step):
        slab = np.array(raw[..., z:z + step], dtype=np.float32)
        if slope != 1 or inter != 0:
            slab = slab * np.float32(slope) + np.float32(inter)
        np.nan_to_num(slab, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        out[..., z:z + step] = slab
    return out


_CONVERT = {"CT": (_to_int16, np.int16), "MR": (_to_float32, np.float32)}


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
                    slope: float, inter: float, modality: str = "CT") -> np.ndarray:
    """Decompresses a .nii.gz's voxels slab by slab (bounded memory) into int16 HU (CT) or
    float32 (MR). A 4D ``(X, Y, Z, C)`` file is read as ``(X, Y, Z * C)`` (the same bytes).

    Never decompresses more than the header implies, and allocates the output only once the
    stream has produced a first full slab, so a forged header costs no memory. Voxel data is
    Fortran-ordered, so each contiguous run of bytes is a slab of whole z-planes.
    """
    convert, out_dtype = _CONVERT[modality]
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
                    out = np.empty(shape, dtype=out_dtype)
                out[..., z0:z0 + k] = convert(raw, slope, inter)
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
    return out if out is not None else np.empty(shape, dtype=out_dtype)


def _load_nifti(path: Path, max_voxels: int, max_bytes: int, modality: str = "CT",
                allow_channels: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Returns (array with slope/intercept applied, affine) after the budget checks.

    The array is int16 (CT) or float32 (MR), ``(X, Y, Z)``, or ``(X, Y, Z, C)`` for a 4D file
    when ``allow_channels``.
    """
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types on broken headers
        raise VolumeReadError(f"{path}: cannot read NIfTI header ({err}); re-export it") from err
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 4 and not allow_channels:
        raise VolumeReadError(f"{path}: expected a 3D volume, header declares shape {img.shape}"
                              " (a 4D file is read as channels only as a study's image)")
    if len(shape) not in (3, 4):
        raise VolumeReadError(f"{path}: expected a 3D volume (or a 4D one, channels last), "
                              f"header declares shape {img.shape}")
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
    # dataset metadata for what the header lacks (t3d_data.header; set by prepare)
    slope, inter, affine = header_fallback(path, hdr, slope, inter, affine)
    if path.name.lower().endswith(".gz"):
        _check_gzip_trailer(path, offset + nbytes)
        flat = (shape[0], shape[1], math.prod(shape[2:]))  # (X, Y, Z*C): the same bytes
        arr = _read_gz_voxels(path, flat, dtype, offset, slope, inter, modality)  # type: ignore[arg-type]
        return arr.reshape(shape, order="F") if len(shape) == 4 else arr, affine
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
    return _CONVERT[modality][0](raw, slope, inter), affine


def _read_dicom(folder: Path, max_voxels: int, max_bytes: int, series_uid: str | None,
                modality: str = "CT") -> tuple[np.ndarray, np.ndarray]:
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
    return _CONVERT[modality][0](array), ras


def _check_modality(modality: str) -> None:
    if modality not in _CONVERT:
        raise ValueError(f"modality must be one of {', '.join(_CONVERT)}; got {modality!r}")


def read_volume(path: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS, *,
                max_bytes: int = DEFAULT_MAX_BYTES, series_uid: str | None = None,
                modality: str = "CT") -> Volume:
    """Reads a 3D volume: CT as RAS-canonical int16 HU, MR as float32.

    Args:
        path: ``.nii``/``.nii.gz`` file, or a folder holding a DICOM series.
        max_voxels: refuse larger volumes (checked on the header, before allocating).
        max_bytes: refuse volumes whose header declares more decoded voxel bytes (voxels x the
            stored datatype's size; checked before allocating).
        series_uid: DICOM SeriesInstanceUID to read when the folder holds several series.
        modality: ``"CT"`` (int16 HU) or ``"MR"`` (float32, no HU conversion).

    Returns:
        The volume with its RAS affine and spacing (slope/intercept applied; CT: HU rounded
        and clipped to the int16 range, NaN -> -1024; MR: float32, non-finite -> 0).

    Raises:
        VolumeReadError: missing, truncated or inconsistent file, too many voxels, several
            DICOM series and none chosen; the message names the file and the fix.
    """
    _check_modality(modality)
    array, affine = _read_any(Path(path), max_voxels, max_bytes, series_uid, modality, False)
    return Volume(array=array, affine=affine, spacing=_spacing(affine))


def _read_any(path: Path, max_voxels: int, max_bytes: int, series_uid: str | None,
              modality: str, allow_channels: bool) -> tuple[np.ndarray, np.ndarray]:
    """Canonical ``(array, affine)`` of a file or DICOM folder; a 4D NIfTI comes back as
    ``(C, X, Y, Z)`` (only when ``allow_channels``)."""
    if path.is_dir():
        array, affine = _read_dicom(path, max_voxels, max_bytes, series_uid, modality)
    elif path.is_file():
        if not path.name.lower().endswith((".nii", ".nii.gz")):
            raise VolumeReadError(f"{path}: unsupported image format; give a .nii/.nii.gz file "
                                  "or a DICOM series folder")
        array, affine = _load_nifti(path, max_voxels, max_bytes, modality, allow_channels)
    else:
        raise VolumeReadError(f"{path}: image not found")
    array, affine = to_canonical(array, affine)
    if array.ndim == 4:  # channels last on disk -> first in memory
        array = np.ascontiguousarray(np.moveaxis(array, 3, 0))
    return array, affine


def read_image(paths: str | Path | Sequence[str | Path], max_voxels: int = DEFAULT_MAX_VOXELS,
               *, max_bytes: int = DEFAULT_MAX_BYTES, series_uid: str | None = None,
               modality: str = "CT", channels: Sequence[str] | None = None) -> Volume:
    """Reads a study's image: one volume, or several channels in one voxel grid.

    - one 3D file or DICOM folder: as :func:`read_volume` (array ``(X, Y, Z)``);
    - one 4D NIfTI ``(X, Y, Z, C)``, channels last (MSD Task01 ``imagesTr``): array
      ``(C, X, Y, Z)``, every channel reoriented like the first;
    - a list of 3D files (BraTS ``[t1n, t1c, t2w, t2f]``): read one by one, checked to share
      one voxel grid (shape and affine after RAS reorientation, within 1e-3 mm), stacked as
      ``(C, X, Y, Z)`` in the list's order. A list of one is a 3D volume.

    Args:
        paths: a path or a list of paths (one per channel).
        max_voxels, max_bytes: the budget of every file (see :func:`read_volume`).
        series_uid: DICOM series to read (single path only).
        modality: ``"CT"`` (int16 HU) or ``"MR"`` (float32).
        channels: the expected channel names (their count is checked; names appear in errors).

    Returns:
        The :class:`Volume`.

    Raises:
        VolumeReadError: any file's problem (as :func:`read_volume`), channels in different
            voxel grids, or a channel count that differs from ``channels``; the message names
            the file and the fix.
    """
    _check_modality(modality)
    if isinstance(paths, str | Path):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("read_image needs at least one path")
    names = list(channels) if channels is not None else None

    def label(k: int) -> str:
        return f"channel {k}" + (f" ({names[k]!r})" if names and k < len(names) else "")

    if len(paths) == 1:
        array, affine = _read_any(paths[0], max_voxels, max_bytes, series_uid, modality, True)
        found = array.shape[0] if array.ndim == 4 else 1
        if names is not None and len(names) != found:
            raise VolumeReadError(
                f"{paths[0]}: the file holds {found} channel{'s' if found != 1 else ''} but the "
                f"manifest's 'channels' names {len(names)} ({', '.join(names)}); fix 'channels' "
                "or give one file per channel in 'image'")
        return Volume(array=array, affine=affine, spacing=_spacing(affine))
    if names is not None and len(names) != len(paths):
        raise VolumeReadError(f"{paths[0]}: {len(paths)} image paths but {len(names)} channel "
                              "names; give one name per path ('channels')")
    arrays: list[np.ndarray] = []
    affine0: np.ndarray | None = None
    for k, path in enumerate(paths):
        array, affine = _read_any(path, max_voxels, max_bytes, None, modality, False)
        if affine0 is None:
            affine0 = affine
        elif array.shape != arrays[0].shape:
            raise VolumeReadError(
                f"{path}: {label(k)} has voxel shape {array.shape} but {label(0)} "
                f"({paths[0].name}) has {arrays[0].shape} (after RAS reorientation); every "
                "channel of 'image' must be in one voxel grid: resample it onto the first "
                "channel's grid")
        elif not np.allclose(affine, affine0, atol=_GRID_ATOL):
            raise VolumeReadError(
                f"{path}: {label(k)}'s affine differs from {label(0)} ({paths[0].name}) by "
                f"{float(np.abs(affine - affine0).max()):.3g} mm (after RAS reorientation); "
                "every channel of 'image' must be in one voxel grid: resample it onto the first "
                "channel's grid")
        arrays.append(array)
    return Volume(array=np.stack(arrays), affine=affine0,  # type: ignore[arg-type]
                  spacing=_spacing(affine0))  # type: ignore[arg-type]


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
