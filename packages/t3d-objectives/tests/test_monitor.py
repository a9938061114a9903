"""embedding_spread / is_collapsed against a naive loop and on known cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from t3d_objectives import embedding_spread, is_collapsed


def _naive(emb, groups):
    z = [e / e.norm() for e in emb.double()]
    same, cross = [], []
    for i, j in itertools.permutations(range(len(z)), 2):
        (same if groups[i] == groups[j] else cross).append(float(z[i] @ z[j]))
    zs = torch.stack(z)
    std = sum(float(zs[:, d].std(unbiased=False)) for d in range(zs.shape[1])) / zs.shape[1]
    return {"same_cos": sum(same) / len(same), "cross_cos": sum(cross) / len(cross), "std": std,
            "std_ratio": std * math.sqrt(zs.shape[1])}


def test_matches_naive_loop():
    torch.manual_seed(0)
    emb, groups = torch.randn(9, 6), torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3])
    got, want = embedding_spread(emb, groups), _naive(emb, groups)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_collapsed_and_spread_embeddings():
    groups = torch.arange(4).repeat_interleave(2)
    torch.manual_seed(0)
    constant = torch.randn(1, 32).expand(8, 32) + 1e-4 * torch.randn(8, 32)
    collapsed = embedding_spread(constant, groups)
    assert collapsed["cross_cos"] > 0.999 and collapsed["std_ratio"] < 0.01
    assert is_collapsed(collapsed)
    spread = embedding_spread(torch.randn(8, 32), groups)
    assert abs(spread["cross_cos"]) < 0.3 and spread["std_ratio"] > 0.5
    assert not is_collapsed(spread)


def test_degenerate_batches_give_nan_not_errors():
    one_group = embedding_spread(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
    assert math.isnan(one_group["cross_cos"]) and not math.isnan(one_group["same_cos"])
    singletons = embedding_spread(torch.randn(3, 4), torch.arange(3))
    assert math.isnan(singletons["same_cos"])
    with pytest.raises(ValueError, match=r"\(N, E\)"):
        embedding_spread(torch.randn(3, 4), torch.arange(2))
