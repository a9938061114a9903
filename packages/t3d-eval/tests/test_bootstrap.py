"""Percentile bootstrap: known normal-mean case, pairing, skipped resamples, AUC and Dice stats."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from t3d_eval import (
    Interval,
    binary_auc,
    bootstrap_ci,
    check_same_units,
    class_mean_statistic,
    linear_probe_scores,
    macro_auc_statistic,
    multilabel_auc,
)


def test_ci_of_a_normal_mean_matches_the_textbook_interval():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=4000)
    ci = bootstrap_ci(x)
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert ci.estimate == pytest.approx(x.mean())
    assert ci.resamples == 1000
    # 1000 resamples: the percentile ends are within ~10 % of the half-width of mean ± 1.96 se
    assert ci.low == pytest.approx(x.mean() - 1.96 * se, abs=0.15 * 1.96 * se)
    assert ci.high == pytest.approx(x.mean() + 1.96 * se, abs=0.15 * 1.96 * se)


def test_statistic_path_equals_vectorised_mean_and_is_seeded():
    x = np.random.default_rng(1).random(50)
    fast = bootstrap_ci(x, n_resamples=300, seed=4)
    slow = bootstrap_ci(x, lambda v: float(np.mean(v)), n_resamples=300, seed=4)
    assert fast.low == pytest.approx(slow.low) and fast.high == pytest.approx(slow.high)
    assert bootstrap_ci(x, n_resamples=300, seed=4) == fast
    assert bootstrap_ci(x, n_resamples=300, seed=5) != fast
    # confidence widens the interval
    wide = bootstrap_ci(x, n_resamples=300, seed=4, confidence=0.99)
    assert wide.low <= fast.low and wide.high >= fast.high


def test_pooling_over_seeds_averages_columns():
    per_seed = np.random.default_rng(2).random((40, 3))
    ci = bootstrap_ci(per_seed, n_resamples=200)
    ref = bootstrap_ci(per_seed.mean(1), n_resamples=200)
    assert ci.estimate == pytest.approx(per_seed.mean())
    assert (ci.low, ci.high) == pytest.approx((ref.low, ref.high))


def test_same_seed_gives_paired_resamples():
    gen = np.random.default_rng(3)
    a = gen.random(30)
    b = a - 0.1 + gen.normal(0, 0.01, 30)  # b is a shifted copy of a
    diff = bootstrap_ci(np.arange(30), lambda i: a[i].mean() - b[i].mean(), n_resamples=500)
    assert 0.09 < diff.low < diff.high < 0.11  # paired: tight, even though a and b vary a lot
    ia, ib = bootstrap_ci(a, n_resamples=500), bootstrap_ci(b, n_resamples=500)
    assert ia.low - ib.low == pytest.approx(0.1, abs=0.02)  # the same resamples for both


def test_undefined_resamples_are_skipped_and_nan_entries_ignored():
    x = np.arange(10.0)
    ci = bootstrap_ci(np.arange(10), lambda i: math.nan if 0 in i else x[i].mean(),
                      n_resamples=400)
    expected = 400 * (0.9**10)  # P(no 0 drawn)
    assert 0.5 * expected < ci.resamples < 1.5 * expected and ci.resamples < 400
    none = bootstrap_ci(np.arange(3), lambda i: math.nan, n_resamples=10)
    assert none.resamples == 0 and math.isnan(none.low) and math.isnan(none.high)
    with_nan = bootstrap_ci(np.array([1.0, math.nan, 3.0]), n_resamples=50)
    assert with_nan.estimate == pytest.approx(2.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci([1.0], n_resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=1.0)
    with pytest.raises(ValueError, match="different units"):
        check_same_units("dice", [["a", "b"], ["a", "c"]])
    check_same_units("dice", [["a", "b"], ["a", "b"]])


def test_interval_serialises():
    ci = Interval(0.5, 0.4, 0.6, 1000)
    assert ci.to_dict() == {"estimate": 0.5, "low": 0.4, "high": 0.6, "resamples": 1000}
    assert str(ci) == "0.5000 [0.4000, 0.6000]"


def test_binary_auc_matches_sklearn_with_ties_and_nan():
    gen = np.random.default_rng(4)
    y = gen.integers(0, 2, 60).astype(float)
    s = np.round(gen.random(60) + 0.3 * y, 1)  # rounded: many ties
    assert binary_auc(s, y) == pytest.approx(roc_auc_score(y, s))
    y_nan = y.copy()
    y_nan[:5] = np.nan
    assert binary_auc(s, y_nan) == pytest.approx(roc_auc_score(y[5:], s[5:]))
    assert math.isnan(binary_auc(s, np.ones(60)))


def test_macro_auc_statistic_matches_multilabel_auc_and_pools_seeds():
    gen = np.random.default_rng(5)
    labels = gen.integers(0, 2, (50, 4)).astype(float)
    labels[:, 3] = 0  # single class: not in the macro
    probs = [np.clip(labels * 0.2 + gen.random((50, 4)), 0, 1) for _ in range(2)]
    ref = [multilabel_auc(torch.from_numpy(p), torch.from_numpy(labels), list("abcd"),
                          skip=["b"])["macro"] for p in probs]
    stat = macro_auc_statistic(probs, labels, skip=[1])
    assert stat(np.arange(50)) == pytest.approx(float(np.mean(ref)))
    one = macro_auc_statistic(probs[0], labels, skip=[1])
    assert one(np.arange(50)) == pytest.approx(ref[0])
    # a resample in which a scored finding has one class is undefined
    only_neg = np.flatnonzero(labels[:, 0] == 0)
    assert math.isnan(stat(np.resize(only_neg, 50)))
    ci = bootstrap_ci(np.arange(50), stat, n_resamples=200)
    assert ci.low < ci.estimate < ci.high and ci.resamples == 200


def test_linear_probe_scores_feed_the_auc():
    gen = np.random.default_rng(6)
    x = gen.normal(size=(120, 8))
    y = (x[:, :2] > 0).astype(float)
    y_tr = y[:80].copy()
    y_tr[:, 1] = 1  # untrainable finding
    probs, untrainable = linear_probe_scores(x[:80], y_tr, x[80:], ["a", "b"])
    assert probs.shape == (40, 2) and untrainable == ["b"] and np.all(probs[:, 1] == 0.5)
    assert binary_auc(probs[:, 0], y[80:, 0]) > 0.9


def test_class_mean_statistic_requires_every_scored_class():
    rows = np.array([[0.5, math.nan], [0.7, 0.2], [0.9, math.nan]])
    stat = class_mean_statistic(rows)
    assert stat(np.arange(3)) == pytest.approx((0.7 + 0.2) / 2)
    assert math.isnan(stat(np.array([0, 2, 2])))  # class 1 not drawn
    pooled = class_mean_statistic([rows, rows + 0.1])
    assert pooled(np.arange(3)) == pytest.approx(((0.7 + 0.2) / 2 + (0.8 + 0.3) / 2) / 2)
