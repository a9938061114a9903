"""embed_volumes, the one volume-embedding path, against naive per-crop loops on a tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import t3d_eval.embedding as emb_mod
import torch
from t3d_eval import CropFeatures, embed_volumes
from torch import nn


class TinyVision(nn.Module):
    """A strided conv as the 'vision tower': encode -> features, tokens -> (N, T, C)."""

    token_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 4, stride=4)
        self.drop = nn.Dropout(0.5)  # differs between train and eval mode

    def encode(self, x, skips=True):
        assert skips is False
        return self.drop(self.conv(x))

    def tokens(self, feats):
        return feats.flatten(2).transpose(1, 2), tuple(feats.shape[2:])


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vision = TinyVision()
        self.proj_v = nn.Linear(3, 2)
        self.config = SimpleNamespace(embed_dim=2)

    def encode_volume_crops(self, crops, study_index=None):
        tokens, _ = self.vision.tokens(self.vision.encode(crops, skips=False))
        return self.proj_v(tokens.mean(1))


class Volumes:
    """VolumeDataset-like items: an image, labels, a report, a group and a study id."""

    def __init__(self, shapes):
        g = torch.Generator().manual_seed(1)
        self.items = [{"image": torch.rand(1, *s, generator=g), "labels": torch.tensor([i % 2, 1.0]),
                       "report": f"report {i}", "group": i // 2, "study_id": f"s{i}"}
                      for i, s in enumerate(shapes)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def naive_crop(volume, start, size):
    """Crop with air (0.0) padding past the far border, by hand."""
    out = torch.zeros(1, *size)
    x, y, z = start
    src = volume[:, x : x + size[0], y : y + size[1], z : z + size[2]]
    out[:, : src.shape[1], : src.shape[2], : src.shape[3]] = src
    return out


def one_by_one(model, crops):
    """The naive reference: one model call per crop, averaged by hand."""
    with torch.no_grad():
        rows = [model.encode_volume_crops(c[None])[0] for c in crops]
    return sum(rows) / len(rows)


@pytest.fixture
def model():
    return TinyModel().train()  # embed_volumes must switch dropout off and restore train mode


def test_sliding_matches_a_naive_loop(model):
    # (12, 8, 6) with crop 8 and overlap 0.5: x starts 0, 4; y 0; z 0 (padded 6 -> 8).
    data = Volumes([(12, 8, 6), (8, 8, 8), (16, 8, 8)])
    out = embed_volumes(model, data, [2, 0], crop_size=(8, 8, 8), mode="sliding", overlap=0.5,
                        batch_size=3)
    assert model.training
    starts = {0: [(0, 0, 0), (4, 0, 0)], 2: [(0, 0, 0), (4, 0, 0), (8, 0, 0)]}
    model.eval()
    for row, i in enumerate([2, 0]):
        vol = data[i]["image"]
        ref = one_by_one(model, [naive_crop(vol, s, (8, 8, 8)) for s in starts[i]])
        assert torch.allclose(out["volume_emb"][row], ref, atol=1e-6)
    assert out["index"].tolist() == [2, 0]
    assert out["labels"].tolist() == [[0.0, 1.0], [0.0, 1.0]]
    assert out["reports"] == ["report 2", "report 0"] and out["study_ids"] == ["s2", "s0"]
    assert out["group"].tolist() == [1, 0]
    assert not out["volume_emb"].requires_grad


def test_random_crops_match_a_naive_loop_and_the_seed(model):
    data = Volumes([(10, 9, 8), (12, 12, 12)])
    out = embed_volumes(model, data, crop_size=(8, 8, 8), mode="random", num_crops=3, seed=5,
                        batch_size=2, keep_crops=True)
    model.eval()
    for i in range(2):
        vol = data[i]["image"]
        rng = np.random.default_rng([5, i])  # dataset position i, whatever the sharding
        starts = [tuple(int(rng.integers(0, d - 8 + 1)) for d in vol.shape[1:])
                  for _ in range(3)]
        ref = one_by_one(model, [naive_crop(vol, s, (8, 8, 8)) for s in starts])
        assert torch.allclose(out["volume_emb"][i], ref, atol=1e-6)
    assert out["crop_emb"].shape == (6, 2) and out["crop_row"].tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.allclose(out["crop_emb"][3:].mean(0), out["volume_emb"][1], atol=1e-6)
    again = embed_volumes(model, data, crop_size=(8, 8, 8), mode="random", num_crops=3, seed=5)
    other = embed_volumes(model, data, crop_size=(8, 8, 8), mode="random", num_crops=3, seed=6)
    assert torch.equal(again["volume_emb"], out["volume_emb"])
    assert not torch.allclose(other["volume_emb"], out["volume_emb"])


def test_given_crops_pooled_tokens_and_a_callable(model):
    g = torch.Generator().manual_seed(2)
    items = [{"crops": torch.rand(3, 1, 8, 8, 8, generator=g), "group": i, "report": str(i)}
             for i in range(2)]
    out = embed_volumes(model, items, mode="crops", batch_size=2, keep_crops=True)
    model.eval()
    for i in range(2):
        assert torch.allclose(out["volume_emb"][i], one_by_one(model, items[i]["crops"]), atol=1e-6)
    assert out["crop_emb"].shape == (6, 2) and "labels" not in out

    feats = embed_volumes(model, items, mode="crops", features="pooled_tokens")
    model.eval()
    with torch.no_grad():
        tokens, _ = model.vision.tokens(model.vision.encode(items[1]["crops"], skips=False))
    assert feats["volume_emb"].shape == (2, 3)
    assert torch.allclose(feats["volume_emb"][1], tokens.mean(1).mean(0), atol=1e-6)
    assert CropFeatures(model, "backbone").dim == 3 and CropFeatures(model).dim == 2

    def double(crops):
        return 2 * model.encode_volume_crops(crops)

    twice = embed_volumes(model, items, mode="crops", features=double)
    assert torch.allclose(twice["volume_emb"], 2 * out["volume_emb"], atol=1e-6)


def test_sharded_over_two_processes_equals_one(model, monkeypatch):
    data = Volumes([(8, 8, 8)] * 5)
    whole = embed_volumes(model, data, [4, 3, 2, 1, 0], crop_size=(8, 8, 8), mode="random",
                          num_crops=2)
    other_rank: list = []

    def gather_rank1(rows, world):
        other_rank.extend(rows)
        return rows

    monkeypatch.setattr(emb_mod, "_gather_rows", gather_rank1)
    acc1 = SimpleNamespace(process_index=1, num_processes=2, device=torch.device("cpu"))
    part = embed_volumes(model, data, [4, 3, 2, 1, 0], crop_size=(8, 8, 8), mode="random",
                         num_crops=2, accelerator=acc1)
    assert part["index"].tolist() == [3, 1]  # rank 1 embeds every second index
    monkeypatch.setattr(emb_mod, "_gather_rows", lambda rows, world: rows + other_rank)
    acc0 = SimpleNamespace(process_index=0, num_processes=2, device=torch.device("cpu"))
    both = embed_volumes(model, data, [4, 3, 2, 1, 0], crop_size=(8, 8, 8), mode="random",
                         num_crops=2, accelerator=acc0)
    assert both["index"].tolist() == [4, 3, 2, 1, 0]
    assert torch.allclose(both["volume_emb"], whole["volume_emb"])


def test_train_and_eval_modes_are_restored(model):
    data = Volumes([(8, 8, 8)])
    model.eval()
    for features in ("embedding", "pooled_tokens", CropFeatures(model)):
        embed_volumes(model, data, crop_size=(8, 8, 8), features=features)
        assert not any(m.training for m in model.modules())  # a wrapper does not flip it
    model.train()
    model.vision.drop.eval()  # a mixed state comes back as it was
    embed_volumes(model, data, crop_size=(8, 8, 8), features=CropFeatures(model, "backbone"))
    assert model.training and model.vision.training and not model.vision.drop.training


def test_clear_errors(model):
    data = Volumes([(8, 8, 8)])
    with pytest.raises(ValueError, match="mode must be one of"):
        embed_volumes(model, data, crop_size=(8, 8, 8), mode="grid")
    with pytest.raises(ValueError, match="needs crop_size"):
        embed_volumes(model, data)
    with pytest.raises(ValueError, match="indices is empty"):
        embed_volumes(model, data, [], crop_size=(8, 8, 8))
    with pytest.raises(ValueError, match="needs items with 'crops'"):
        embed_volumes(model, data, mode="crops")
    with pytest.raises(ValueError, match="features must be one of"):
        embed_volumes(model, data, crop_size=(8, 8, 8), features="logits")
    assert model.training
