"""Pre-training data: the epoch sampler, corruption seeded per (seed, epoch, study), failure markers."""

from __future__ import annotations

import pytest
import torch
from t3d_data import (
    CropConfig,
    CropDataset,
    EpochShuffleSampler,
    PretrainDataset,
    collate_pretrain,
    prepare,
)
from torch.utils.data import DataLoader


@pytest.fixture
def store(tmp_path_factory, make_dataset):
    manifest = make_dataset(3, shape=(40, 36, 32))
    out = tmp_path_factory.mktemp("store")
    prepare(manifest, out, chunk=32, progress=False)
    return out


class NoiseCorruption:
    """A duck-typed corruption: adds generator noise and masks where the noise is positive."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, crops, generator=None):
        self.calls += 1
        noise = torch.randn(crops.shape, generator=generator)
        return crops + noise, (noise > 0).float()


def test_sampler_is_a_seeded_permutation_cut_to_whole_global_batches():
    s = EpochShuffleSampler(10, seed=3, global_batch=4)
    ref = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 1_000_003 + 0))
    assert list(s) == ref[:8].tolist() and len(s) == 8
    s.use_epoch(2)
    ref2 = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 1_000_003 + 2))
    assert list(s) == ref2[:8].tolist() and list(s) != ref[:8].tolist()
    assert list(s) == list(s)  # the epoch, not a hidden counter, decides the order
    again = EpochShuffleSampler(10, seed=3, global_batch=4)
    again.use_epoch(2)
    assert list(again) == list(s)  # e.g. after a resume
    assert list(EpochShuffleSampler(10, seed=3, shuffle=False, global_batch=4)) == list(range(8))
    assert sorted(EpochShuffleSampler(7, seed=0)) == list(range(7))
    with pytest.raises(ValueError, match="global_batch must be >= 1"):
        EpochShuffleSampler(10, seed=0, global_batch=0)


def test_corruption_is_seeded_by_seed_epoch_and_study(store):
    crops = CropDataset(store, CropConfig(crop_size=(32, 32, 32), num_crops=2))
    corruption = NoiseCorruption()
    ds = PretrainDataset(crops, corruption, seed=5)
    a, b = ds[1], ds[1]
    assert torch.equal(a["corrupted"], b["corrupted"]) and corruption.calls == 2
    expected_noise = torch.randn(a["crops"].shape, generator=torch.Generator().manual_seed(
        (5 * 1_000_003 + 0) * 1_000_003 + 1))
    assert torch.allclose(a["corrupted"] - a["crops"], expected_noise, atol=1e-6)
    assert torch.equal(a["corruption_mask"], (expected_noise > 0).float())
    assert not torch.equal(ds[0]["corrupted"] - ds[0]["crops"], a["corrupted"] - a["crops"])
    ds.use_epoch(1)
    assert crops.epoch == 1
    c = ds[1]
    assert not torch.equal(c["corrupted"] - c["crops"], a["corrupted"] - a["crops"])
    clean = PretrainDataset(crops, None, seed=5)[1]
    assert "corrupted" not in clean and torch.equal(clean["crops"], c["crops"])


def test_unreadable_study_becomes_a_marker_and_collate_counts_it(store):
    crops = CropDataset(store, CropConfig(crop_size=(32, 32, 32), num_crops=2))
    key = crops.store.records[1].key
    for chunk in (store / "studies" / key / "image" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"garbage")
    ds = PretrainDataset(crops, NoiseCorruption(), seed=0)
    bad = ds[1]
    assert bad["study_id"] == "ct_001" and "cannot read crops" in bad["error"]
    loader = DataLoader(ds, batch_size=3, collate_fn=collate_pretrain)
    batch = next(iter(loader))
    assert batch["num_samples"] == 3 and [sid for sid, _ in batch["failed"]] == ["ct_001"]
    assert batch["study_ids"] == ["ct_000", "ct_002"]
    assert batch["crops"].shape == batch["corrupted"].shape == (4, 1, 32, 32, 32)
    assert batch["study_index"].tolist() == [0, 0, 1, 1]
    assert torch.equal(batch["corrupted"][2:], ds[2]["corrupted"])
    only_bad = collate_pretrain([bad])
    assert only_bad == {"failed": [("ct_001", bad["error"])], "num_samples": 1}
