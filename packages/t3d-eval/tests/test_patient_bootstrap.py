"""Patient-level (cluster) bootstrap against a naive loop; thresholds and F1 against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score, roc_curve
from t3d_eval import (
    bootstrap_ci,
    cluster_resamples,
    macro_auc_statistic,
    operating_thresholds,
    threshold_metrics,
)


def _naive_patient_ci(values, patients, n_resamples, seed, confidence=0.95):
    """The textbook patient bootstrap, one loop: draw patients, pool their studies, take the mean."""
    order = list(dict.fromkeys(patients))
    draws = np.random.default_rng([seed, 20231201]).integers(0, len(order), (n_resamples, len(order)))
    stats = []
    for row in draws:
        pooled = [v for p in row for v, q in zip(values, patients, strict=True) if q == order[p]]
        stats.append(np.mean(pooled))
    a = (1 - confidence) / 2
    return np.quantile(stats, [a, 1 - a])


def test_patient_bootstrap_equals_the_naive_loop():
    gen = np.random.default_rng(0)
    patients = [f"p{k}" for k in gen.integers(0, 9, size=25)]  # 9 patients, 1-6 studies each
    values = gen.normal(size=25) + np.array([int(p[1:]) for p in patients])  # patient effect
    ci = bootstrap_ci(values, clusters=patients, n_resamples=400, seed=3)
    low, high = _naive_patient_ci(values, patients, 400, 3)
    assert (ci.low, ci.high) == pytest.approx((low, high))
    assert ci.estimate == pytest.approx(values.mean()) and ci.resamples == 400
    # a custom statistic goes through the same resamples
    same = bootstrap_ci(values, lambda v: float(np.mean(v)), clusters=patients, n_resamples=400,
                        seed=3)
    assert (same.low, same.high) == pytest.approx((low, high))
    # and is wider than pretending the studies were independent (patient effect)
    naive = bootstrap_ci(values, n_resamples=400, seed=3)
    assert ci.high - ci.low > naive.high - naive.low


def test_duplicated_studies_give_the_interval_of_their_patients():
    # every patient has 4 identical studies: resampling patients = resampling their values
    per_patient = np.random.default_rng(1).random(30)
    values = np.repeat(per_patient, 4)
    patients = np.repeat(np.arange(30), 4).tolist()
    ci = bootstrap_ci(values, clusters=patients, n_resamples=500, seed=2)
    ref = bootstrap_ci(per_patient, n_resamples=500, seed=2)
    assert (ci.estimate, ci.low, ci.high) == pytest.approx((ref.estimate, ref.low, ref.high))


def test_singleton_patients_are_the_study_level_bootstrap():
    x = np.random.default_rng(4).random(40)
    a = bootstrap_ci(x, clusters=list(range(40)), n_resamples=300, seed=5)
    b = bootstrap_ci(x, n_resamples=300, seed=5)
    assert a == b


def test_resamples_hold_whole_patients():
    patients = ["a", "a", "b", "c", "c", "c", "d"]
    for idx in cluster_resamples(patients, n_resamples=50, seed=0):
        drawn = [patients[i] for i in idx]
        for p in set(drawn):
            members = [i for i, q in enumerate(patients) if q == p]
            assert drawn.count(p) % len(members) == 0  # every study of a drawn patient, k times
        assert len({patients[i] for i in idx}) <= 4
    assert [r.tolist() for r in cluster_resamples(patients, 5, 1)] == [
        r.tolist() for r in cluster_resamples(patients, 5, 1)]  # seeded: paired arms


def test_patient_bootstrap_of_macro_auc_and_bad_clusters():
    gen = np.random.default_rng(6)
    y = (gen.random((60, 2)) < 0.5).astype(float)
    p = y + gen.normal(0, 1.0, (60, 2))
    patients = (np.arange(60) // 3).tolist()
    ci = bootstrap_ci(np.arange(60), macro_auc_statistic(p, y), clusters=patients, n_resamples=200)
    assert ci.low <= ci.estimate <= ci.high and 0.5 < ci.estimate < 1.0
    with pytest.raises(ValueError, match="clusters has 3 entries for 60 units"):
        bootstrap_ci(np.arange(60), clusters=[0, 1, 2])
    with pytest.raises(ValueError, match="clusters is empty"):
        cluster_resamples([])


def test_youden_threshold_is_the_roc_point_of_largest_j():
    gen = np.random.default_rng(7)
    y = (gen.random((80, 3)) < 0.35).astype(float)
    s = y * 0.6 + gen.random((80, 3))
    y[5, 2] = np.nan
    t = operating_thresholds(s, y, "youden")
    for j in range(3):
        k = ~np.isnan(y[:, j])
        fpr, tpr, thr = roc_curve(y[k, j], s[k, j])
        best = max(range(len(thr)), key=lambda i: (tpr[i] - fpr[i], -i))
        assert t[j] == thr[best]
        # brute force over every candidate cut: no threshold has a larger J
        pred = s[k, j][:, None] >= np.unique(s[k, j])[None, :]
        pos, neg = y[k, j] == 1, y[k, j] == 0
        j_all = pred[pos].mean(0) - pred[neg].mean(0)
        yj = ((s[k, j] >= t[j])[pos]).mean() - ((s[k, j] >= t[j])[neg]).mean()
        assert yj == pytest.approx(j_all.max())


def test_f1_threshold_maximises_f1_and_single_class_is_nan():
    gen = np.random.default_rng(8)
    y = (gen.random((70, 2)) < 0.3).astype(float)
    s = y * 0.5 + gen.random((70, 2))
    y[:, 1] = 0.0  # one class only: no threshold
    t = operating_thresholds(s, y, "f1")
    best = max(f1_score(y[:, 0], s[:, 0] >= c) for c in np.unique(s[:, 0]))
    assert f1_score(y[:, 0], s[:, 0] >= t[0]) == pytest.approx(best)
    assert math.isnan(t[1])
    with pytest.raises(ValueError, match="rule must be one of"):
        operating_thresholds(s, y, "median")


def test_threshold_metrics_match_sklearn():
    gen = np.random.default_rng(9)
    y = (gen.random((90, 4)) < 0.4).astype(float)
    s = gen.random((90, 4)) + 0.3 * y
    y[gen.random((90, 4)) < 0.1] = np.nan
    y[:, 3] = np.where(np.isnan(y[:, 3]), np.nan, 1.0)  # single class: NaN
    t = np.array([0.5, 0.7, 0.2, 0.5])
    m = threshold_metrics(s, y, t)
    for j in range(3):
        k = ~np.isnan(y[:, j])
        pred = s[k, j] >= t[j]
        assert m["f1"][j] == pytest.approx(f1_score(y[k, j], pred))
        assert m["balanced_accuracy"][j] == pytest.approx(balanced_accuracy_score(y[k, j], pred))
        assert m["sensitivity"][j] == pytest.approx(recall_score(y[k, j], pred))
        assert m["specificity"][j] == pytest.approx(recall_score(y[k, j], pred, pos_label=0))
    assert all(math.isnan(m[key][3]) for key in m)
