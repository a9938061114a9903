import numpy as np
import pytest
import torch
from t3d_data import (
    CropConfig,
    CropDataset,
    DataConfig,
    RandCropSampler,
    StudyLoadError,
    VolumeDataset,
    build_crop_loader,
    collate_crops,
    prepare,
)
from torch.utils.data import DataLoader


@pytest.fixture
def store(tmp_path_factory, make_dataset):
    manifest = make_dataset(5, shape=(70, 40, 36))
    out = tmp_path_factory.mktemp("store")
    prepare(manifest, out, chunk=32, progress=False)
    return out


def test_crop_size_must_be_multiple_of_32():
    with pytest.raises(ValueError, match=r"crop size \(80, 96, 96\) must be a multiple of 32 in "
                                         r"every dimension; got 80 in dim 0"):
        CropConfig(crop_size=(80, 96, 96))
    with pytest.raises(ValueError, match="got 48 in dim 2"):
        RandCropSampler((64, 64, 48))
    with pytest.raises(ValueError, match="extra"):
        CropConfig(crop=(32, 32, 32))
    with pytest.raises(ValueError, match="low < high"):
        CropConfig(hu_window=(100, -100))


def test_padding_small_volume_with_air():
    vol = np.full((20, 40, 30), 100, np.int16)
    s = RandCropSampler((32, 32, 32), num_crops=3, max_air_fraction=1.0, hu_window=(-1024, 1024))
    crops = s(lambda box: vol[box], vol.shape, np.random.default_rng(1))
    assert crops.shape == (3, 32, 32, 32) and crops.dtype == np.float32
    for c in crops:
        tissue = np.isclose(c, (100 + 1024) / 2048)
        assert tissue.sum() == 20 * 32 * 30  # whole volume in x and z, a 32 slab of y
        assert np.all(c[~tissue] == 0.0)  # padding is -1024 HU -> 0


def test_air_crops_are_redrawn():
    vol = np.full((128, 64, 64), -1000, np.int16)
    vol[96:] = 50  # only the last quarter along x is tissue
    read_boxes = []

    def read(box):
        read_boxes.append(box)
        return vol[box]

    s = RandCropSampler((32, 32, 32), num_crops=4, max_air_fraction=0.5, max_redraws=50)
    crops = s(read, vol.shape, np.random.default_rng(0))
    assert s.redraws_used > 0 and len(read_boxes) == 4 + s.redraws_used
    for c in crops:  # window -1000..1000: tissue 50 HU -> 0.525, air -> 0
        assert (c > 0.5).mean() >= 0.5
    none = RandCropSampler((32, 32, 32), num_crops=1, max_air_fraction=0.5, max_redraws=0)
    none(read, vol.shape, np.random.default_rng(0))
    assert none.redraws_used == 0


def test_window_applies_to_crop():
    vol = np.array([-2000, -1000, 0, 1000, 3000], np.int16).reshape(5, 1, 1) * np.ones((1, 32, 32), np.int16)
    s = RandCropSampler((32, 32, 32), num_crops=1, max_air_fraction=1.0)
    (c,) = s(lambda box: vol[box], vol.shape, np.random.default_rng(0))
    vals = sorted(set(np.round(np.unique(c), 4)))
    assert vals == [0.0, 0.5, 1.0]


def test_dataset_items_and_collate(store):
    ds = CropDataset(store, CropConfig(crop_size=(32, 32, 32), num_crops=2))
    item = ds[0]
    assert item["crops"].shape == (2, 1, 32, 32, 32) and item["crops"].dtype == torch.float32
    assert 0 <= item["crops"].min() and item["crops"].max() <= 1
    assert item["study_id"] == "ct_000" and isinstance(item["group"], int)
    batch = collate_crops([ds[0], ds[1], ds[2]])
    assert batch["crops"].shape == (6, 1, 32, 32, 32)
    assert batch["study_index"].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch["study_index"].dtype == torch.long and batch["group"].dtype == torch.long
    assert batch["group"].shape == (3,) and batch["reports"][0].startswith("Findings: case 0.")
    assert batch["study_ids"] == ["ct_000", "ct_001", "ct_002"]
    # same (seed, epoch, index) -> same crops; another epoch -> different
    assert torch.equal(ds[3]["crops"], ds[3]["crops"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["crops"], item["crops"])


def test_max_studies_keeps_the_first_studies_of_the_split(store):
    full = CropDataset(store, CropConfig(crop_size=(32, 32, 32), num_crops=1))
    two = CropDataset(store, CropConfig(crop_size=(32, 32, 32), num_crops=1), max_studies=2)
    assert len(full) > 2 and len(two) == 2 and two.indices == full.indices[:2]
    assert torch.equal(two[1]["crops"], full[1]["crops"])
    assert len(CropDataset(store, max_studies=100)) == len(full)
    with pytest.raises(ValueError, match="max_studies must be >= 1"):
        CropDataset(store, max_studies=0)
    loader = build_crop_loader(DataConfig(store=store, split=None, max_studies=2, batch_size=1,
                                          num_workers=0, crop=CropConfig(crop_size=(32, 32, 32))))
    assert len(loader) == 2


def test_crops_identical_across_worker_counts(store):
    cfg = DataConfig(store=store, split=None, crop=CropConfig(crop_size=(32, 32, 32), num_crops=2, seed=7),
                     batch_size=2, num_workers=0, drop_last=False)
    runs = []
    for workers in (0, 2):
        loader = build_crop_loader(cfg.model_copy(update={"num_workers": workers}), epoch=3)
        runs.append(list(loader))
    assert len(runs[0]) == 3
    for a, b in zip(*runs, strict=True):
        assert a["study_ids"] == b["study_ids"]
        assert torch.equal(a["crops"], b["crops"])


def test_bad_study_raises_study_load_error(store):
    ds = CropDataset(store, CropConfig(crop_size=(32, 32, 32), num_crops=1))
    key = ds.store.records[1].key
    for chunk in (store / "studies" / key / "image" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"garbage")
    with pytest.raises(StudyLoadError, match="study 'ct_001'") as exc:
        ds[1]
    assert exc.value.study_id == "ct_001"
    loader = DataLoader(ds, batch_size=1, num_workers=1, collate_fn=collate_crops)
    it = iter(loader)
    assert next(it)["study_ids"] == ["ct_000"]
    with pytest.raises(StudyLoadError, match="ct_001"):  # type survives the worker
        next(it)
    assert next(it)["study_ids"] == ["ct_002"]  # the loop can count it and go on
    it._shutdown_workers()  # do not wait for garbage collection (5 s worker timeout)


def test_volume_dataset(store):
    ds = VolumeDataset(store, finding_names=["nodule", "effusion", "mass"])
    item = ds[0]
    assert item["image"].shape == (1, 70, 40, 36) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 70, 40, 36) and "mask" not in ds[1]
    assert item["labels"][:2].tolist() == [0.0, 0.0] and torch.isnan(item["labels"][2])
    assert ds[1]["labels"][0].item() == 1.0
    assert item["spacing"].tolist() == [1.0, 1.0, 1.0] and item["affine"].shape == (4, 4)
