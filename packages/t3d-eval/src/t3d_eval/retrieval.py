"""Cross-modal retrieval metrics: volume→report / report→volume Recall@K, median rank, twins.

Follows the T3D evaluation protocol (docs/method.md, "Evaluation"): cosine similarity, a hit when
any item of the query's report group is retrieved, so identical reports are not distinct answers.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from t3d_eval.distributed import gather_embeddings
from t3d_eval.embedding import (
    sliding_window_starts,
    volume_embedding_from_crops,
    volume_embedding_sliding,
)

__all__ = [
    "chance_retrieval",
    "cosine_similarity_matrix",
    "gather_embeddings",
    "group_ids",
    "retrieval_metrics",
    "retrieval_ranks",
    "sliding_window_starts",
    "twin_accuracy",
    "volume_embedding_from_crops",
    "volume_embedding_sliding",
]


def _check_2d(name: str, x: Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (M, E); got {tuple(x.shape)}")


def cosine_similarity_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of every row of ``a`` with every row of ``b``.

    Args:
        a: ``(M, E)`` embeddings.
        b: ``(N, E)`` embeddings.

    Returns:
        ``(M, N)`` float32 matrix of cosine similarities.
    """
    _check_2d("a", a)
    _check_2d("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"embedding sizes differ: {a.shape[1]} (dim 1 of a) vs {b.shape[1]} (dim 1 of b)"
        )
    a = F.normalize(a.detach().float(), dim=-1)
    b = F.normalize(b.detach().float(), dim=-1)
    return a @ b.T


def group_ids(groups: Tensor | Sequence[Hashable] | None, num_items: int) -> Tensor:
    """Turn report groups (ints, strings, any hashable) into a ``(M,)`` long tensor.

    Args:
        groups: one group per item, or ``None`` (every item its own group).
        num_items: ``M``, the number of items.

    Returns:
        ``(M,)`` long tensor; equal values mean the same report group.

    Raises:
        ValueError: if ``groups`` does not hold exactly ``num_items`` entries.
    """
    if groups is None:
        return torch.arange(num_items)
    if isinstance(groups, Tensor):
        out = groups.detach().reshape(-1).long().cpu()
    else:
        codes: dict[Hashable, int] = {}
        out = torch.tensor([codes.setdefault(g, len(codes)) for g in groups], dtype=torch.long)
    if out.numel() != num_items:
        raise ValueError(f"groups has {out.numel()} entries but there are {num_items} items")
    return out


def retrieval_ranks(similarity: Tensor, relevant: Tensor) -> Tensor:
    """1-based rank of the best relevant item for each query (row).

    The rank is ``1 + #(non-relevant items scoring at least as high as the best relevant one)``:
    ties are broken against the query, so a constant encoder gets the worst rank, not the best.

    Args:
        similarity: ``(Q, N)`` scores, higher is better.
        relevant: ``(Q, N)`` bool, True where the item answers the query.

    Returns:
        ``(Q,)`` long tensor of ranks in ``1..N``.

    Raises:
        ValueError: if shapes differ or a query has no relevant item.
    """
    if similarity.shape != relevant.shape:
        raise ValueError(
            f"similarity {tuple(similarity.shape)} and relevant {tuple(relevant.shape)} differ"
        )
    relevant = relevant.bool()
    missing = (~relevant.any(dim=1)).nonzero().flatten()
    if missing.numel():
        raise ValueError(f"query {int(missing[0])} has no relevant item")
    best = similarity.masked_fill(~relevant, float("-inf")).max(dim=1, keepdim=True).values
    beaten = (similarity >= best) & ~relevant
    return 1 + beaten.sum(dim=1)


def _summarise(prefix: str, ranks: Tensor, ks: Sequence[int]) -> dict[str, float]:
    out = {f"{prefix}_recall@{k}": (ranks <= k).float().mean().item() for k in ks}
    out[f"{prefix}_median_rank"] = ranks.float().quantile(0.5).item()
    out[f"{prefix}_mean_rank"] = ranks.float().mean().item()
    return out


def retrieval_metrics(
    volume_emb: Tensor,
    report_emb: Tensor,
    groups: Tensor | Sequence[Hashable] | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Volume→report and report→volume Recall@K and median rank (cosine similarity).

    Row ``i`` of ``volume_emb`` and of ``report_emb`` belong to study ``i``. For a volume query
    ``i``, every report ``j`` with ``groups[j] == groups[i]`` is a correct answer (identical
    reports are not distinct answers); likewise for report queries. Recall@K is the fraction of
    queries whose best correct answer has rank ≤ K; ranks are 1-based, ties count against the
    query (see :func:`retrieval_ranks`).

    Args:
        volume_emb: ``(M, E)`` volume embeddings.
        report_emb: ``(M, E)`` report embeddings.
        groups: ``(M,)`` report group per study (ints or any hashables); ``None`` = all distinct.
        ks: the K values.

    Returns:
        ``{"v2r_recall@K", "v2r_median_rank", "v2r_mean_rank", "r2v_recall@K",
        "r2v_median_rank", "r2v_mean_rank"}`` as floats; recall in ``[0, 1]``.

    Raises:
        ValueError: on mismatched shapes or a K < 1.

    Example:
        >>> v = torch.eye(3); r = torch.eye(3)
        >>> retrieval_metrics(v, r, ks=(1,))["v2r_recall@1"]
        1.0
    """
    _check_2d("volume_emb", volume_emb)
    _check_2d("report_emb", report_emb)
    if volume_emb.shape[0] != report_emb.shape[0]:
        raise ValueError(
            f"volume_emb has {volume_emb.shape[0]} rows but report_emb has {report_emb.shape[0]}; "
            "row i of both must be study i"
        )
    bad = [k for k in ks if int(k) < 1]
    if bad:
        raise ValueError(f"ks must be >= 1; got {bad[0]}")
    m = volume_emb.shape[0]
    g = group_ids(groups, m)
    sim = cosine_similarity_matrix(volume_emb.cpu(), report_emb.cpu())
    relevant = g[:, None] == g[None, :]
    out = _summarise("v2r", retrieval_ranks(sim, relevant), ks)
    out.update(_summarise("r2v", retrieval_ranks(sim.T, relevant.T), ks))
    return out


def chance_retrieval(
    groups: Tensor | Sequence[Hashable] | None, num_items: int | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """What :func:`retrieval_metrics` expects from random scores, given the report groups.

    A query whose group has ``r`` of the ``n`` items ranks its best correct answer beyond
    ``j`` with probability ``C(n - j, r) / C(n, r)`` (the first ``j`` places all wrong). Hence
    Recall@K ``= mean over queries of 1 - C(n - K, r) / C(n, r)``, the mean rank ``= mean of
    1 + (n - r) / (r + 1)``, and the median rank is the median of the pooled rank distribution
    (what the median over many queries tends to; ``(n + 1) / 2`` for distinct reports). The
    values are the same for both directions (v2r, r2v), since groups are shared.

    Args:
        groups: one report group per study, as for :func:`retrieval_metrics` (``None`` with
            ``num_items``: all distinct).
        num_items: the number of studies when ``groups`` is ``None``.
        ks: the K values.

    Returns:
        ``{"recall@K": ..., "median_rank": ..., "mean_rank": ...}`` as floats.

    Raises:
        ValueError: on no items or a K < 1.

    Example:
        >>> chance_retrieval(None, 10, ks=(1, 5))["recall@5"]
        0.5
    """
    n = num_items if groups is None else len(groups)
    if n is None or n < 1:
        raise ValueError("chance_retrieval needs at least one item (pass groups or num_items)")
    bad = [k for k in ks if int(k) < 1]
    if bad:
        raise ValueError(f"ks must be >= 1; got {bad[0]}")
    g = group_ids(groups, n)
    sizes = torch.bincount(g)[g].tolist()

    def beyond(j: int, r: int) -> float:  # P(rank > j) for a group of r
        return math.comb(n - j, r) / math.comb(n, r) if j <= n - r else 0.0

    out = {f"recall@{k}": sum(1.0 - beyond(int(k), r) for r in sizes) / n for k in ks}
    cdf = [sum(1.0 - beyond(j, r) for r in sizes) / n for j in range(1, n + 1)]
    j = next(j for j in range(1, n + 1) if cdf[j - 1] >= 0.5 - 1e-12)
    # exactly half at or below j: the median lies between j and j + 1 (10 items: 5.5)
    out["median_rank"] = j + 0.5 if abs(cdf[j - 1] - 0.5) < 1e-12 and j < n else float(j)
    out["mean_rank"] = sum(1.0 + (n - r) / (r + 1) for r in sizes) / n
    return out


def twin_accuracy(volume_emb: Tensor, true_report_emb: Tensor, twin_report_emb: Tensor) -> float:
    """Fraction of volumes closer to their own report than to its twin (a minimally edited copy).

    Args:
        volume_emb: ``(M, E)``.
        true_report_emb: ``(M, E)`` embedding of each study's own report.
        twin_report_emb: ``(M, E)`` embedding of the twin report (e.g. one finding negated).

    Returns:
        Fraction in ``[0, 1]`` where ``cos(v, true) > cos(v, twin)`` (ties count as misses).

    Raises:
        ValueError: on mismatched shapes.
    """
    for name, x in (("true_report_emb", true_report_emb), ("twin_report_emb", twin_report_emb)):
        if x.shape != volume_emb.shape:
            raise ValueError(
                f"{name} {tuple(x.shape)} differs from volume_emb {tuple(volume_emb.shape)}"
            )
    _check_2d("volume_emb", volume_emb)
    v = F.normalize(volume_emb.detach().float(), dim=-1)
    s_true = (v * F.normalize(true_report_emb.detach().float(), dim=-1)).sum(-1)
    s_twin = (v * F.normalize(twin_report_emb.detach().float(), dim=-1)).sum(-1)
    return (s_true > s_twin).float().mean().item()
