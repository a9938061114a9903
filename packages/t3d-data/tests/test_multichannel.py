"""Multi-channel (MRI) images: a list of NIfTIs or one 4D NIfTI, stored with a channel axis,
and the per-channel foreground z-score (issue 11.3)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from t3d_data import VolumeReadError, VolumeStore, prepare, read_mask
from t3d_data.readers import read_image, read_volume

LPS = np.array([[-0.8, 0, 0, 50], [0, -0.7, 0, 60], [0, 0, 2.5, -30], [0, 0, 0, 1]])
NAMES = ["t1n", "t1c", "t2w", "t2f"]


def _mr(shape=(20, 18, 16), seed=0) -> np.ndarray:
    """Four float32 'sequences': 0 outside an ellipsoid 'brain', a different intensity each."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = (grid**2).sum(0) < 0.5
    chans = [np.where(inside, rng.normal(300 * (c + 1), 40, shape), 0) for c in range(4)]
    return np.stack(chans).astype(np.float32)


def _save(path, array, affine=LPS, slope=None):
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    if slope is not None:
        img.header.set_slope_inter(*slope)
    nib.save(img, str(path))
    return path


def test_list_and_4d_nifti_read_the_same_channels(tmp_path):
    arr = _mr()
    paths = [_save(tmp_path / f"{n}.nii.gz", arr[c]) for c, n in enumerate(NAMES)]
    four_gz = _save(tmp_path / "four.nii.gz", np.moveaxis(arr, 0, 3))
    four = _save(tmp_path / "four.nii", np.moveaxis(arr, 0, 3))
    listed = read_image(paths, modality="MR", channels=NAMES)
    assert listed.array.shape == (4, 20, 18, 16) and listed.array.dtype == np.float32
    assert listed.n_channels == 4 and listed.spatial_shape == (20, 18, 16)
    # LPS on disk -> RAS in memory: axes 0 and 1 flipped, values kept exactly (no HU rounding)
    assert np.array_equal(listed.array, np.flip(arr, (1, 2)))
    for c, p in enumerate(paths):
        one = read_volume(p, modality="MR")
        assert np.array_equal(one.array, listed.array[c]) and np.allclose(one.affine,
                                                                          listed.affine)
    for path in (four_gz, four):
        vol = read_image(path, modality="MR", channels=NAMES)
        assert np.array_equal(vol.array, listed.array) and np.allclose(vol.affine, listed.affine)
    # MR: slope/intercept applied, float32 kept; CT of the same file: int16 HU
    scaled = _save(tmp_path / "s.nii", np.array([[[0, 10], [20, 31]]], np.int16), np.eye(4),
                   (0.5, 1.0))
    assert read_volume(scaled, modality="MR").array.tolist() == [[[1.0, 6.0], [11.0, 16.5]]]
    assert read_volume(scaled).array.dtype == np.int16
    # a 4D file is channels only as a study image
    with pytest.raises(VolumeReadError, match="expected a 3D volume"):
        read_volume(four_gz, modality="MR")


def test_channels_in_different_grids_are_clear_errors(tmp_path):
    arr = _mr()
    good = [_save(tmp_path / f"{n}.nii.gz", arr[c]) for c, n in enumerate(NAMES)]
    small = _save(tmp_path / "small.nii.gz", arr[2, :, :, :10])
    with pytest.raises(VolumeReadError, match=r"small\.nii\.gz: channel 2 \('t2w'\) has voxel "
                                              r"shape \(20, 18, 10\) but channel 0 \('t1n'\)"
                                              r".*one voxel grid: resample"):
        read_image([good[0], good[1], small, good[3]], modality="MR", channels=NAMES)
    moved = LPS.copy()
    moved[0, 3] += 2.0
    shifted = _save(tmp_path / "shifted.nii.gz", arr[3], moved)
    with pytest.raises(VolumeReadError, match=r"shifted\.nii\.gz: channel 3 \('t2f'\)'s affine "
                                              r"differs from channel 0 .* by 2 mm"):
        read_image([*good[:3], shifted], modality="MR", channels=NAMES)
    four = _save(tmp_path / "four.nii.gz", np.moveaxis(arr, 0, 3))
    with pytest.raises(VolumeReadError, match=r"four\.nii\.gz: the file holds 4 channels but "
                                              r"the manifest's 'channels' names 2"):
        read_image(four, modality="MR", channels=["t1", "t2"])


def _brats_like(tmp_path, n=2):
    rows = []
    for i in range(n):
        arr = _mr(seed=i)
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        image = [str(_save(folder / f"case{i}-{name}.nii.gz", arr[c]).name)
                 for c, name in enumerate(NAMES)]
        seg = np.zeros(arr.shape[1:], np.uint8)
        seg[8:12, 7:11, 6:10] = 1 + (np.arange(4)[:, None, None] % 3)
        _save(folder / f"case{i}-seg.nii.gz", seg)
        rows.append({"study_id": f"case{i}", "patient_id": f"p{i}", "modality": "MR",
                     "image": [f"case{i}/{p}" for p in image], "channels": NAMES,
                     "mask": f"case{i}/case{i}-seg.nii.gz", "split": "train"})
    _save(tmp_path / "ct.nii.gz", np.full((20, 18, 16), 40, np.int16))
    rows.append({"study_id": "ct", "patient_id": "pct", "image": "ct.nii.gz",
                 "report": "No acute findings.", "split": "test"})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return manifest


def test_store_round_trip_of_four_channel_studies(tmp_path):
    manifest = _brats_like(tmp_path)
    prepare(manifest, tmp_path / "store", chunk=8, progress=False)
    store = VolumeStore(tmp_path / "store")
    assert [store.n_channels(i) for i in range(3)] == [4, 4, 1]
    for i in range(2):
        rec = store.records[i]
        folder = tmp_path / f"case{i}"
        src = read_image([folder / f"case{i}-{n}.nii.gz" for n in NAMES], modality="MR")
        assert rec.modality == "MR" and rec.channels == NAMES and rec.shape == (20, 18, 16)
        assert json.loads(rec.source) == [str(folder / f"case{i}-{n}.nii.gz") for n in NAMES]
        whole = store.read(i)
        assert whole.dtype == np.float32 and np.array_equal(whole, src.array)
        box = (slice(3, 17), slice(5, 18), slice(0, 11))
        part = store.read(i, box)
        assert np.array_equal(part, src.array[(slice(None), *box)])
        assert np.array_equal(part, np.asarray(store.array(i)[(slice(None), *box)]))  # zarr
        assert np.array_equal(store.read_mask(i),
                              read_mask(folder / f"case{i}-seg.nii.gz").array)
        meta = json.loads((tmp_path / "store/studies" / rec.key / "image/zarr.json").read_text(encoding="utf-8"))
        assert meta["shape"] == [4, 20, 18, 16] and meta["data_type"] == "float32"
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, 8, 8, 8]
    assert store._fast_layout(0, "image") is not None  # the direct chunk reader served it
    # the CT study is stored as before the channel fields existed: 3D int16, no new keys
    assert store.read(2).dtype == np.int16 and store.read(2).shape == (20, 18, 16)
    index = json.loads((tmp_path / "store/index.json").read_text(encoding="utf-8"))
    assert {"n_channels", "channels", "modality"} <= set(index["studies"][0])
    assert not {"n_channels", "channels", "modality"} & set(index["studies"][2])
    # a rerun reuses the unchanged studies; reordering channel files is a change
    assert prepare(manifest, tmp_path / "store", chunk=8, progress=False).skipped == 3
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    rows[0]["image"] = rows[0]["image"][::-1]
    rows[0]["channels"] = NAMES[::-1]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    summary = prepare(manifest, tmp_path / "store", chunk=8, progress=False)
    assert (summary.prepared, summary.skipped) == (1, 2)
    store = VolumeStore(tmp_path / "store")
    assert np.array_equal(store.read(0), src_0 := read_image(
        [tmp_path / "case0" / f"case0-{n}.nii.gz" for n in NAMES[::-1]], modality="MR").array)
    assert src_0.shape[0] == 4


def _naive_zscore(image: np.ndarray) -> np.ndarray:
    """Reference: every channel's non-zero voxels, one at a time, in float64."""
    out = np.zeros(image.shape, np.float64)
    for c in range(image.shape[0]):
        idx = np.argwhere(image[c] != 0)
        values = [float(image[c][tuple(i)]) for i in idx]
        if not values:
            continue
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5 or 1.0
        for i, v in zip(idx, values, strict=True):
            out[c][tuple(i)] = (v - mean) / std
    return out


def test_zscore_foreground_matches_a_naive_loop():
    from t3d_data.crops import apply_intensity, zscore_foreground

    arr = _mr((8, 7, 6), seed=4)
    arr[3] = 0  # a channel without foreground stays 0
    arr[2][arr[2] != 0] = 5.0  # std 0: centred only
    got = zscore_foreground(arr)
    assert got.dtype == np.float32 and got.shape == arr.shape
    np.testing.assert_allclose(got, _naive_zscore(arr), atol=1e-5)
    assert np.all(got[arr == 0] == 0) and np.all(got[3] == 0) and np.all(got[2] == 0)
    for c in range(2):  # mean 0, std 1 over each channel's foreground
        fg = got[c][arr[c] != 0]
        assert abs(fg.mean()) < 1e-5 and abs(fg.std() - 1) < 1e-5
    np.testing.assert_array_equal(zscore_foreground(arr[0]), got[0])  # 3D = one channel
    np.testing.assert_array_equal(apply_intensity(arr, "zscore_foreground"), got)
    with pytest.raises(ValueError, match="intensity must be one of hu_window_linear, "
                                         "zscore_foreground; got 'minmax'"):
        apply_intensity(arr, "minmax")
    # MONAI's NormalizeIntensity(nonzero=True, channel_wise=True) is compared in t3d-eval's
    # test_segmentation.py (importing MONAI here would cost the t3d-data tests ~15 s)


def test_volume_dataset_serves_channels_with_the_mri_policy(tmp_path):
    from t3d_data import CropDataset, StoreError, VolumeDataset
    from t3d_data.crops import zscore_foreground

    prepare(_brats_like(tmp_path), tmp_path / "store", chunk=8, progress=False)
    ds = VolumeDataset(tmp_path / "store", split="train", intensity="zscore_foreground")
    item = ds[1]
    assert item["image"].shape == (4, 20, 18, 16) and item["mask"].shape == (1, 20, 18, 16)
    np.testing.assert_array_equal(item["image"].numpy(),
                                  zscore_foreground(VolumeStore(tmp_path / "store").read(1)))
    with pytest.raises(StoreError, match=r"study 'case0' is MR, but intensity hu_window_linear "
                                         r"windows CT HU; use intensity='zscore_foreground'"):
        VolumeDataset(tmp_path / "store", split="train")
    ct = VolumeDataset(tmp_path / "store", split="test")  # the CT study: 1 channel, windowed
    assert ct[0]["image"].shape == (1, 20, 18, 16) and float(ct[0]["image"].max()) == pytest.approx(0.52)
    with pytest.raises(StoreError, match="random-crop pre-training reads single-channel CT"):
        CropDataset(tmp_path / "store", split="train")
