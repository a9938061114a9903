import gzip
import struct

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import io_orientation
from t3d_data import VolumeReadError, read_mask, read_volume

RAS = np.array([[0, 1], [1, 1], [2, 1]])


def _marker_world(vol):
    idx = np.unravel_index(np.argmax(vol.array), vol.array.shape)
    return (vol.affine @ [*idx, 1])[:3]


def test_nifti_roundtrip_and_scaling(tmp_path, write_nifti, body_volume):
    arr = body_volume()
    vol = read_volume(write_nifti(tmp_path / "a.nii.gz", arr))
    assert vol.array.dtype == np.int16 and np.array_equal(vol.array, arr)
    assert vol.spacing == (1.0, 1.0, 1.0)
    # float data with slope/intercept -> rounded, clipped to int16
    f = np.array([[[-40000.4, 12.6], [1.0, 99999.0]]], dtype=np.float32)
    img = nib.Nifti1Image(f, np.eye(4))
    img.header.set_data_dtype(np.float32)
    nib.save(img, tmp_path / "f.nii")
    assert read_volume(tmp_path / "f.nii").array.tolist() == [[[-32768, 13], [1, 32767]]]
    raw = np.array([[[0, 1000], [2048, 24]]], dtype=np.uint16)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "s.nii")
    assert read_volume(tmp_path / "s.nii").array.tolist() == [[[-1024, -24], [1024, -1000]]]


def test_lps_nifti_comes_out_ras(tmp_path, write_nifti):
    arr = np.zeros((10, 12, 8), np.int16)
    arr[2, 3, 4] = 1000
    affine = np.array([[-0.8, 0, 0, 50], [0, -0.7, 0, 60], [0, 0, 2.5, -30], [0, 0, 0, 1]])
    vol = read_volume(write_nifti(tmp_path / "lps.nii.gz", arr, affine))
    assert np.array_equal(io_orientation(vol.affine), RAS)
    assert np.allclose(np.diag(vol.affine)[:3], [0.8, 0.7, 2.5])
    assert vol.array.shape == (10, 12, 8) and vol.spacing == pytest.approx((0.8, 0.7, 2.5))
    assert np.allclose(_marker_world(vol), (affine @ [2, 3, 4, 1])[:3])
    assert np.unravel_index(np.argmax(vol.array), vol.array.shape) == (7, 8, 4)


def test_oblique_permuted_nifti_comes_out_ras(tmp_path, write_nifti):
    arr = np.zeros((9, 11, 13), np.int16)
    arr[1, 7, 5] = 1000
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    perm = np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]])  # axes: -> S, L, A ... scrambled
    affine = np.eye(4)
    affine[:3, :3] = rot @ perm @ np.diag([0.9, 1.1, 3.0])
    affine[:3, 3] = [10, -20, 5]
    path = write_nifti(tmp_path / "obl.nii", arr, affine)
    vol = read_volume(path)
    ref = nib.as_closest_canonical(nib.load(path))
    assert np.array_equal(io_orientation(vol.affine), RAS)
    assert np.allclose(vol.affine, ref.affine) and np.array_equal(vol.array, np.asanyarray(ref.dataobj))
    assert np.allclose(_marker_world(vol), (affine @ [1, 7, 5, 1])[:3])
    mask = read_mask(path)
    assert mask.array.dtype == np.int16 and np.allclose(mask.affine, vol.affine)


def test_truncated_nii_is_refused(tmp_path, write_nifti, body_volume):
    path = write_nifti(tmp_path / "t.nii", body_volume())
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(VolumeReadError, match=r"t\.nii: file is truncated.*re-export"):
        read_volume(path)
    gz = write_nifti(tmp_path / "t.nii.gz", body_volume())
    gz.write_bytes(gz.read_bytes()[:-300])
    with pytest.raises(VolumeReadError, match=r"t\.nii\.gz: .*(gzip trailer|truncated)"):
        read_volume(gz)


def test_header_lying_about_size_is_refused_before_allocating(tmp_path, write_nifti, body_volume):
    path = write_nifti(tmp_path / "lie.nii", body_volume())
    data = bytearray(path.read_bytes())
    data[42:48] = struct.pack("<3h", 30000, 30000, 30000)  # dim[1..3]: 2.7e13 voxels
    path.write_bytes(bytes(data))
    with pytest.raises(VolumeReadError, match=r"lie\.nii: header declares \(30000, 30000, 30000\).*max_voxels"):
        read_volume(path)
    data[42:48] = struct.pack("<3h", 40, 36, 64)  # plausible, but twice the data on disk
    path.write_bytes(bytes(data))
    with pytest.raises(VolumeReadError, match="implies 184,672 bytes, file has 92,512"):
        read_volume(path)
    gz = tmp_path / "lie.nii.gz"
    gz.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(VolumeReadError, match="gzip trailer"):
        read_volume(gz)
    with pytest.raises(VolumeReadError, match="max_voxels=1,000"):
        read_volume(write_nifti(tmp_path / "ok.nii", body_volume()), max_voxels=1000)


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(VolumeReadError, match="image not found"):
        read_volume(tmp_path / "nope.nii")
    (tmp_path / "x.mha").write_bytes(b"x")
    with pytest.raises(VolumeReadError, match="unsupported image format"):
        read_volume(tmp_path / "x.mha")
    (tmp_path / "h.nii").write_bytes(b"\0" * 100)
    with pytest.raises(VolumeReadError, match="cannot read NIfTI header"):
        read_volume(tmp_path / "h.nii")


def _write_dicom_series(folder, hu, uid, origin, spacing=(0.7, 0.8, 2.0), order=None):
    """Writes an int16 HU volume (x, y, z) as a CT series, file names in a shuffled order."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.ascontiguousarray(hu.transpose(2, 1, 0)))  # (z,y,x)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    nz = hu.shape[2]
    for rank, k in enumerate(order if order is not None else range(nz)):
        sl = img[:, :, k]
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": uid,
            "0008|0018": f"{uid}.{k + 1}", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{p:.4f}" for p in pos),
            "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": str(spacing[2]),
            "0028|1052": "-1024", "0028|1053": "1",
        }.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"f{rank:03d}_{uid[-3:]}.dcm"))
        writer.Execute(sl)


def test_dicom_series_lps_to_ras_and_several_series(tmp_path):
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 400, size=(12, 10, 6)).astype(np.int16)
    hu[2, 7, 4] = 2000
    folder = tmp_path / "dcm"
    _write_dicom_series(folder, hu, "1.2.3.444", origin=(-50.0, -40.0, 100.0),
                        order=[3, 0, 5, 1, 4, 2])
    vol = read_volume(folder)
    assert np.array_equal(io_orientation(vol.affine), RAS)
    assert vol.spacing == pytest.approx((0.7, 0.8, 2.0))
    # LPS world of the marker: origin + index * spacing; RAS flips x and y.
    lps = np.array([-50 + 2 * 0.7, -40 + 7 * 0.8, 100 + 4 * 2.0])
    assert np.allclose(_marker_world(vol), lps * [-1, -1, 1], atol=1e-3)
    # voxel values (rescale intercept applied) equal the source, axes flipped to R, A
    assert np.array_equal(vol.array, hu[::-1, ::-1, :])

    _write_dicom_series(folder, hu + 1, "1.2.3.555", origin=(-50.0, -40.0, 100.0))
    with pytest.raises(VolumeReadError, match=r"2 DICOM series in one folder \(.*1\.2\.3\.444.*1\.2\.3\.555"):
        read_volume(folder)
    assert np.array_equal(read_volume(folder, series_uid="1.2.3.555").array, hu[::-1, ::-1] + 1)
    with pytest.raises(VolumeReadError, match="series '9.9' not found"):
        read_volume(folder, series_uid="9.9")
    with pytest.raises(VolumeReadError, match="max_voxels"):
        read_volume(folder, series_uid="1.2.3.444", max_voxels=100)
    # the budget uses the pixel type SimpleITK decodes into (int32 here: rescale applied)
    with pytest.raises(VolumeReadError, match=r"dcm: header declares \(12, 10, 6\) 32-bit signed"
                       r" integer = 720 voxels x 4 bytes = 2,880 bytes, more than max_bytes=1,000"):
        read_volume(folder, series_uid="1.2.3.444", max_bytes=1000)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeReadError, match="no DICOM series"):
        read_volume(tmp_path / "empty")
