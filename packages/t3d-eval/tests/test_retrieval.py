"""Retrieval metrics against a naive loop and torchmetrics' retrieval metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from t3d_eval import retrieval_metrics, retrieval_ranks, twin_accuracy
from torchmetrics.retrieval import RetrievalHitRate, RetrievalRecall


def naive_ranks(vol: torch.Tensor, rep: torch.Tensor, groups: list[int]) -> list[int]:
    """Sort every row by cosine similarity and return the 1-based position of the first hit."""
    ranks = []
    for i in range(len(vol)):
        sims = [
            float(torch.dot(vol[i], rep[j]) / (vol[i].norm() * rep[j].norm()))
            for j in range(len(rep))
        ]
        order = sorted(range(len(rep)), key=lambda j: -sims[j])
        ranks.append(next(p + 1 for p, j in enumerate(order) if groups[j] == groups[i]))
    return ranks


@pytest.mark.parametrize("with_groups", [False, True])
def test_matches_naive_loop(with_groups: bool):
    gen = torch.Generator().manual_seed(0)
    m, e = 40, 8
    vol, rep = torch.randn(m, e, generator=gen), torch.randn(m, e, generator=gen)
    groups = torch.randint(0, 12, (m,), generator=gen).tolist() if with_groups else list(range(m))
    out = retrieval_metrics(vol, rep, groups if with_groups else None, ks=(1, 5, 10))
    for prefix, (q, d) in {"v2r": (vol, rep), "r2v": (rep, vol)}.items():
        ranks = naive_ranks(q, d, groups)
        for k in (1, 5, 10):
            assert out[f"{prefix}_recall@{k}"] == pytest.approx(np.mean([r <= k for r in ranks]))
        assert out[f"{prefix}_median_rank"] == pytest.approx(float(np.median(ranks)))
        assert out[f"{prefix}_mean_rank"] == pytest.approx(float(np.mean(ranks)))


@pytest.mark.parametrize("with_groups", [False, True])
def test_matches_torchmetrics(with_groups: bool):
    gen = torch.Generator().manual_seed(1)
    m = 30
    vol, rep = torch.randn(m, 6, generator=gen), torch.randn(m, 6, generator=gen)
    groups = torch.randint(0, 10, (m,), generator=gen) if with_groups else torch.arange(m)
    out = retrieval_metrics(vol, rep, groups if with_groups else None, ks=(1, 5))
    sim = torch.nn.functional.normalize(vol, dim=1) @ torch.nn.functional.normalize(rep, dim=1).T
    target = groups[:, None] == groups[None, :]
    indexes = torch.arange(m)[:, None].expand(m, m)
    for k in (1, 5):
        # One relevant report per query: recall == hit rate. With groups, "any hit" = hit rate.
        metric = RetrievalHitRate(top_k=k) if with_groups else RetrievalRecall(top_k=k)
        ref_v2r = metric(sim.flatten(), target.flatten(), indexes=indexes.flatten())
        ref_r2v = metric(sim.T.flatten(), target.T.flatten(), indexes=indexes.flatten())
        assert out[f"v2r_recall@{k}"] == pytest.approx(ref_v2r.item())
        assert out[f"r2v_recall@{k}"] == pytest.approx(ref_r2v.item())


def test_identical_reports_are_not_distinct_answers():
    # Studies 0 and 1 share the report "No acute findings"; volume 0 lies on report 1.
    vol = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    rep = torch.tensor([[0.2, 1.0], [0.0, 1.0], [1.0, 0.0]])
    plain = retrieval_metrics(vol, rep, ks=(1,))
    grouped = retrieval_metrics(
        vol, rep, ["No acute findings", "No acute findings", "Nodule"], ks=(1,)
    )
    assert plain["v2r_recall@1"] == pytest.approx(2 / 3)
    assert grouped["v2r_recall@1"] == 1.0
    assert grouped["v2r_median_rank"] == 1.0


def test_constant_encoder_gets_the_worst_rank():
    # Every volume embeds the same: a report query sees 5 tied volumes; ties count against it.
    ranks = retrieval_ranks(torch.zeros(5, 5), torch.eye(5, dtype=torch.bool))
    assert ranks.tolist() == [5] * 5
    out = retrieval_metrics(torch.ones(5, 4), torch.randn(5, 4), ks=(1,))
    assert out["r2v_recall@1"] == 0.0 and out["r2v_median_rank"] == 5.0


def test_perfect_embeddings():
    out = retrieval_metrics(torch.eye(4), torch.eye(4) * 3.0, ks=(1, 10))
    assert out["v2r_recall@1"] == out["r2v_recall@1"] == 1.0
    assert out["v2r_median_rank"] == 1.0


def test_twin_accuracy():
    vol = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    true = torch.tensor([[1.0, 0.1], [0.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
    twin = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    # hit, miss, hit, tie (a tie is a miss)
    assert twin_accuracy(vol, true, twin) == pytest.approx(0.5)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="row i of both"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="groups has 2 entries"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(3, 4), [0, 1])
    with pytest.raises(ValueError, match="ks must be >= 1"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(3, 4), ks=(0,))
    assert not math.isnan(retrieval_metrics(torch.randn(3, 4), torch.randn(3, 4))["r2v_mean_rank"])


@pytest.mark.parametrize("groups", [list(range(10)), [0, 0, 1, 1, 1, 2, 3, 4, 5, 5, 5, 5]])
def test_chance_retrieval_matches_random_scores(groups):
    """The chance values are what random scores give, on average, through retrieval_metrics."""
    from t3d_eval import chance_retrieval

    chance = chance_retrieval(groups, ks=(1, 5))
    gen = torch.Generator().manual_seed(0)
    runs = [retrieval_metrics(torch.randn(len(groups), 8, generator=gen),
                              torch.randn(len(groups), 8, generator=gen), groups=groups, ks=(1, 5))
            for _ in range(400)]
    for k in (1, 5):
        mean = sum(r[f"v2r_recall@{k}"] for r in runs) / len(runs)
        assert mean == pytest.approx(chance[f"recall@{k}"], abs=0.03)
    assert sum(r["v2r_mean_rank"] for r in runs) / len(runs) == pytest.approx(
        chance["mean_rank"], rel=0.05)
    if len(set(groups)) == len(groups):
        assert chance["median_rank"] == 5.5 and chance["recall@1"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="at least one item"):
        chance_retrieval([], ks=(1,))
