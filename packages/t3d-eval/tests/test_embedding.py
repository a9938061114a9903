"""Volume embeddings from crops: sliding-window coverage, random crops and the model adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from t3d_eval import (
    embed_studies,
    sliding_window_starts,
    volume_embedding_from_crops,
    volume_embedding_sliding,
)


class Recorder:
    """An encode_fn that records every crop and embeds it as (mean, max)."""

    def __init__(self) -> None:
        self.crops: list[torch.Tensor] = []

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        assert crops.ndim == 5 and crops.shape[1] == 1
        self.crops.extend(crops)
        flat = crops.flatten(1)
        return torch.stack([flat.mean(1), flat.amax(1)], dim=1)


def test_sliding_window_covers_the_whole_volume():
    shape, crop = (37, 10, 50), (16, 16, 16)
    # Unique positive value per voxel; air padding is 0.
    volume = torch.arange(1, np.prod(shape) + 1, dtype=torch.float32).reshape(1, *shape)
    rec = Recorder()
    emb = volume_embedding_sliding(rec, volume, crop, overlap=0.25, batch_size=3)
    starts = sliding_window_starts((37, 16, 50), crop, 0.25)
    assert len(rec.crops) == len(starts) == 3 * 1 * 4
    assert all(tuple(c.shape) == (1, *crop) for c in rec.crops)
    seen = torch.unique(torch.cat([c.flatten() for c in rec.crops]))
    assert seen[0] == 0.0  # the short axis (10 < 16) was padded with air
    assert torch.equal(seen[1:], volume.flatten())  # every voxel is in some crop
    expected = torch.stack([c.flatten() for c in rec.crops])
    assert torch.allclose(emb, torch.stack([expected.mean(1), expected.amax(1)], 1).mean(0))


def test_sliding_window_starts_end_at_the_border():
    starts = sliding_window_starts((100, 32, 33), (32, 32, 32), overlap=0.5)
    xs = sorted({s[0] for s in starts})
    assert xs == [0, 16, 32, 48, 64, 68]
    assert sorted({s[1] for s in starts}) == [0]
    assert sorted({s[2] for s in starts}) == [0, 1]
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_starts((10, 10, 10), (4, 4, 4), overlap=1.0)


def test_random_crops_are_seeded_and_counted():
    volume = torch.rand(1, 20, 24, 28)
    a, b = Recorder(), Recorder()
    ea = volume_embedding_from_crops(a, volume, (8, 8, 8), num_crops=5, rng=3, batch_size=2)
    eb = volume_embedding_from_crops(b, volume, (8, 8, 8), num_crops=5, rng=3)
    assert len(a.crops) == 5 and torch.allclose(ea, eb)
    assert all(torch.equal(x, y) for x, y in zip(a.crops, b.crops, strict=True))
    assert all(tuple(c.shape) == (1, 8, 8, 8) for c in a.crops)
    with pytest.raises(ValueError, match=r"\(1, X, Y, Z\)"):
        volume_embedding_from_crops(a, volume[0], (8, 8, 8), 2)
    with pytest.raises(ValueError, match="num_crops"):
        volume_embedding_from_crops(a, volume, (8, 8, 8), 0)


class DuckModel(torch.nn.Module):
    """Implements the EncoderModel protocol with trivial encoders."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def encode_volume_crops(self, crops, study_index=None):
        assert not self.training
        return torch.stack([crops.flatten(1).mean(1), crops.flatten(1).std(1)], 1) * self.scale

    def encode_text(self, reports):
        return torch.tensor([[float(len(r)), 1.0] for r in reports])


def test_embed_studies_with_a_duck_typed_model():
    samples = [
        {
            "image": torch.rand(1, 20, 20, 20),
            "report": "a" * (i + 1),
            "labels": torch.tensor([i % 2]),
        }
        for i in range(3)
    ]
    model = DuckModel()
    out = embed_studies(model, samples, (16, 16, 16), text_batch_size=2)
    assert model.training  # restored
    assert out["volume_emb"].shape == (3, 2) and out["report_emb"].shape == (3, 2)
    assert out["report_emb"][:, 0].tolist() == [1.0, 2.0, 3.0]
    assert out["labels"].shape == (3, 1)
    rnd = embed_studies(DuckModel(), samples, (16, 16, 16), mode="random", num_crops=2)
    assert not rnd["volume_emb"].requires_grad
