"""Percentile-bootstrap confidence intervals over test units (studies, batches of studies).

Resampling draws ``n`` units with replacement, ``n_resamples`` times, from a generator seeded
only by ``seed``: every call with the same ``(n, n_resamples, seed)`` uses the **same**
resamples, so intervals of two arms scored on the same test studies are paired, and a
difference statistic (``lambda idx: stat_a(idx) - stat_b(idx)``) is a paired bootstrap.

Several seeds of one arm are pooled by scoring the same resampled studies for every seed and
averaging the metric over seeds (:func:`macro_auc_statistic` and :func:`class_mean_statistic`
take one array per seed); the interval then reflects which test studies were drawn, for the
seed-averaged model, not the spread between seeds (report that separately).

**Patient-level (cluster) resampling.** Studies of one patient are not independent (follow-up
scans, several reconstructions of one scan). With ``clusters`` (one id per unit, e.g. the
patient id of each study), :func:`bootstrap_ci` draws *patients* with replacement and takes every
study of each drawn patient (:func:`cluster_resamples`); with one study per patient this is the
study-level bootstrap, resample for resample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Interval",
    "binary_auc",
    "bootstrap_ci",
    "check_same_units",
    "class_mean_statistic",
    "cluster_resamples",
    "macro_auc_statistic",
]


class Interval(NamedTuple):
    """A point estimate and its percentile-bootstrap interval.

    ``estimate`` is the statistic on the full sample, ``low``/``high`` the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled statistics,
    ``resamples`` how many resamples gave a finite statistic (the others were skipped).
    """

    estimate: float
    low: float
    high: float
    resamples: int

    def to_dict(self) -> dict[str, float | int]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high,
                "resamples": self.resamples}

    def __str__(self) -> str:
        return f"{self.estimate:.4f} [{self.low:.4f}, {self.high:.4f}]"


def _resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 20231201]).integers(0, n, size=(n_resamples, n))


def _cluster_codes(clusters: Sequence[Hashable]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Cluster number of each unit (in order of first appearance) and each cluster's units."""
    codes: dict[Hashable, int] = {}
    of_unit = np.array([codes.setdefault(c, len(codes)) for c in clusters], dtype=int)
    order = np.argsort(of_unit, kind="stable")
    bounds = np.cumsum(np.bincount(of_unit, minlength=len(codes)))[:-1]
    return of_unit, np.split(order, bounds)


def cluster_resamples(clusters: Sequence[Hashable], n_resamples: int = 1000,
                      seed: int = 0) -> list[np.ndarray]:
    """Unit indices of ``n_resamples`` cluster-bootstrap resamples (e.g. patients of studies).

    Clusters are numbered in order of first appearance in ``clusters``; each resample draws
    ``P`` cluster numbers with replacement (``P`` = number of clusters), from the generator
    :func:`bootstrap_ci` uses for ``P`` units with the same ``seed``, and takes every unit of
    each drawn cluster (in unit order). So the same ``(clusters, n_resamples, seed)`` gives the
    same resamples (paired arms), and singleton clusters ``0..n-1`` give exactly the unit-level
    resamples.

    Args:
        clusters: one hashable id per unit (e.g. the patient id of each test study).
        n_resamples: number of resamples.
        seed: resampling seed.

    Returns:
        ``n_resamples`` integer arrays of unit indices (their lengths vary with cluster sizes).

    Raises:
        ValueError: on no units or ``n_resamples < 1``.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1; got {n_resamples}")
    if len(clusters) == 0:
        raise ValueError("clusters is empty; pass one cluster id (e.g. patient id) per unit")
    _, members = _cluster_codes(clusters)
    draws = _resample_indices(len(members), n_resamples, seed)
    return [np.concatenate([members[c] for c in row]) for row in draws]


def bootstrap_ci(
    values: Any,
    statistic: Callable[[np.ndarray], float] | None = None,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    clusters: Sequence[Hashable] | None = None,
) -> Interval:
    """Percentile bootstrap interval of ``statistic`` over the units along axis 0 of ``values``.

    Args:
        values: array-like whose axis 0 indexes the resampling units, e.g. ``(n,)`` per-study
            values or ``(n, S)`` per-study values of S seeds. To resample several arrays
            jointly, pass ``np.arange(n)`` and a ``statistic`` that indexes them.
        statistic: ``values[idx] -> float`` for a resampled ``values`` (``idx`` of length n
            drawn with replacement). NaN / inf means "undefined on this resample" (e.g. a class
            is missing) and the resample is skipped. Default: the mean of all finite entries
            (over units and seeds), computed vectorised.
        n_resamples: number of resamples (default 1000).
        confidence: interval mass in (0, 1) (default 0.95).
        seed: resampling seed; the same ``(n, n_resamples, seed)`` gives the same resamples.
        clusters: one id per unit (e.g. the patient id of each study): resample whole clusters
            (:func:`cluster_resamples`), the patient-level bootstrap. ``None``: every unit is
            its own cluster (the unit-level bootstrap).

    Returns:
        :class:`Interval` (``low = high = NaN`` when no resample gave a finite statistic).

    Raises:
        ValueError: on an empty ``values``, ``n_resamples < 1``, ``confidence`` outside (0, 1)
            or ``clusters`` of another length than ``values``.

    Example:
        >>> ci = bootstrap_ci(np.arange(100.0))
        >>> ci.low < 49.5 < ci.high
        True
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1; got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    data = np.asarray(values)
    if data.ndim == 0 or data.shape[0] == 0:
        raise ValueError("values is empty; pass one entry per resampling unit along axis 0")
    n = data.shape[0]
    if clusters is not None:
        if len(clusters) != n:
            raise ValueError(f"clusters has {len(clusters)} entries for {n} units; pass one "
                             "cluster id (e.g. patient id) per unit along axis 0 of values")
        stats = _cluster_stats(data, statistic, clusters, n_resamples, seed)
        estimate = _mean_finite(data) if statistic is None else float(statistic(data))
        return _interval(estimate, stats, confidence)
    idx = _resample_indices(n, n_resamples, seed)
    if statistic is None:
        flat = data.astype(float).reshape(n, -1)
        finite = np.isfinite(flat)
        sums = np.where(finite, flat, 0.0).sum(1)
        counts = finite.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            estimate = float(sums.sum() / counts.sum()) if counts.sum() else math.nan
            stats = sums[idx].sum(1) / counts[idx].sum(1)
    else:
        estimate = float(statistic(data))
        stats = np.array([float(statistic(data[i])) for i in idx])
    return _interval(estimate, stats, confidence)


def _mean_finite(data: np.ndarray) -> float:
    flat = data.astype(float).reshape(-1)
    flat = flat[np.isfinite(flat)]
    return float(flat.mean()) if flat.size else math.nan


def _cluster_stats(data: np.ndarray, statistic: Callable[[np.ndarray], float] | None,
                   clusters: Sequence[Hashable], n_resamples: int, seed: int) -> np.ndarray:
    if statistic is not None:
        return np.array([float(statistic(data[i]))
                         for i in cluster_resamples(clusters, n_resamples, seed)])
    # the mean of the finite entries, vectorised over per-cluster sums and counts
    of_unit, members = _cluster_codes(clusters)
    flat = data.astype(float).reshape(data.shape[0], -1)
    finite = np.isfinite(flat)
    sums = np.bincount(of_unit, np.where(finite, flat, 0.0).sum(1), minlength=len(members))
    counts = np.bincount(of_unit, finite.sum(1), minlength=len(members))
    draws = _resample_indices(len(members), n_resamples, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums[draws].sum(1) / counts[draws].sum(1)


def _interval(estimate: float, stats: np.ndarray, confidence: float) -> Interval:
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return Interval(estimate, math.nan, math.nan, 0)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return Interval(estimate, float(low), float(high), int(stats.size))


def binary_auc(scores: Any, labels: Any) -> float:
    """ROC AUC of one finding: ``P(score_pos > score_neg) + ½ P(tie)`` (Mann-Whitney).

    Equal to scikit-learn's ``roc_auc_score`` / torchmetrics' ``BinaryAUROC`` (ties count ½).
    NaN labels are ignored; NaN when only one class is present.
    """
    s = np.asarray(scores, dtype=float).reshape(-1)
    y = np.asarray(labels, dtype=float).reshape(-1)
    keep = ~np.isnan(y)
    s, y = s[keep], y[keep]
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def _per_seed(arrays: Any) -> list[np.ndarray]:
    if isinstance(arrays, np.ndarray) or hasattr(arrays, "numpy"):
        arrays = [arrays]
    out = [np.asarray(a.numpy() if hasattr(a, "numpy") else a, dtype=float) for a in arrays]
    if not out:
        raise ValueError("no arrays given; pass one per seed")
    return out


def _two_classes(column: np.ndarray) -> bool:
    c = column[~np.isnan(column)]
    return bool((c == 0).any() and (c == 1).any())


def macro_auc_statistic(
    probs: Any, labels: Any, skip: Iterable[int] = ()
) -> Callable[[np.ndarray], float]:
    """A bootstrap statistic ``idx -> macro AUC``, averaged over seeds, for :func:`bootstrap_ci`.

    The macro is over the findings (columns) that have both classes in the full ``labels`` and
    are not in ``skip`` (e.g. findings untrainable in the probe): the same findings as
    :func:`t3d_eval.multilabel_auc` with ``skip``. A resample in which one of these findings has
    a single class returns NaN (skipped by :func:`bootstrap_ci`) instead of silently averaging
    fewer findings.

    Args:
        probs: ``(M, F)`` test scores, or a sequence of them, one per seed (same studies).
        labels: ``(M, F)`` binary labels (NaN = unknown), shared by the seeds.
        skip: column indices to leave out.

    Returns:
        ``statistic(idx)``; use with ``bootstrap_ci(np.arange(M), statistic)``.
    """
    per_seed = _per_seed(probs)
    y = np.asarray(labels, dtype=float)
    if y.ndim != 2 or any(p.shape != y.shape for p in per_seed):
        raise ValueError(f"probs {[p.shape for p in per_seed]} and labels {y.shape} must all "
                         "be (M, F)")
    skipped = set(int(j) for j in skip)
    cols = [j for j in range(y.shape[1]) if j not in skipped and _two_classes(y[:, j])]

    def statistic(idx: np.ndarray) -> float:
        idx = np.asarray(idx, dtype=int)
        if not cols:
            return math.nan
        yy = y[idx]
        if not all(_two_classes(yy[:, j]) for j in cols):
            return math.nan
        return float(np.mean([np.mean([binary_auc(p[idx, j], yy[:, j]) for j in cols])
                              for p in per_seed]))

    return statistic


def class_mean_statistic(per_class: Any) -> Callable[[np.ndarray], float]:
    """A bootstrap statistic ``idx -> mean over classes of the class-wise mean over units``.

    For Dice: ``per_class`` is ``(M, C)`` per-study Dice of each class (NaN where the class is
    absent from the study's label), or a sequence of them, one per seed (same studies). On the
    full sample this equals MONAI's ``DiceMetric(reduction="mean_batch")`` averaged over the
    classes that have a Dice (:func:`t3d_eval.evaluate_segmentation`'s ``"mean"``), averaged
    over seeds. A resample that lacks every study of one of those classes returns NaN (skipped).
    """
    per_seed = _per_seed(per_class)
    if any(p.ndim != 2 or p.shape != per_seed[0].shape for p in per_seed):
        raise ValueError(f"per_class arrays must all be (M, C); got {[p.shape for p in per_seed]}")
    cols = [np.isfinite(p).any(0) for p in per_seed]

    def statistic(idx: np.ndarray) -> float:
        idx = np.asarray(idx, dtype=int)
        vals = []
        for p, keep in zip(per_seed, cols, strict=True):
            if not keep.any():
                return math.nan
            sub = p[idx][:, keep]
            finite = np.isfinite(sub)
            counts = finite.sum(0)
            if not counts.all():
                return math.nan
            vals.append((np.where(finite, sub, 0.0).sum(0) / counts).mean())
        return float(np.mean(vals))

    return statistic


def check_same_units(name: str, ids: Sequence[Sequence[Any]]) -> None:
    """Raise ``ValueError`` unless every run lists the same units (e.g. study ids) in order."""
    first = list(ids[0])
    for k, other in enumerate(ids[1:], start=1):
        if list(other) != first:
            raise ValueError(f"{name}: run {k} was scored on different units than run 0; "
                             "pooled and paired intervals need the same test studies in the same "
                             "order")
