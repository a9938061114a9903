"""Embedding-spread statistics: see a contrastive collapse while it happens.

A collapsed encoder maps every crop to (nearly) the same vector; InfoNCE-style losses then sit
exactly at their chance values (log(N-1) for TCL, log B for alignment) and carry almost no
gradient. These statistics are cheap (one N×N cosine matrix) and are logged every step by
``tools/pretrain.py``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["COLLAPSE_CROSS_COSINE", "COLLAPSE_STD_RATIO", "embedding_spread", "is_collapsed"]

#: Mean cross-group cosine above which an embedding counts as collapsed.
COLLAPSE_CROSS_COSINE = 0.95
#: ``std * sqrt(E)`` below which an embedding counts as collapsed (1 for isotropic embeddings).
COLLAPSE_STD_RATIO = 0.1


@torch.no_grad()
def embedding_spread(emb: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    """Spread of a batch of embeddings ``(N, E)`` with group ids ``(N,)``.

    Returns:
        ``same_cos``: mean cosine between distinct rows of the same group (nan when no group
        has two rows); ``cross_cos``: mean cosine between rows of different groups (nan when
        there is one group); ``std``: mean over dimensions of the standard deviation across
        rows of the L2-normalised embedding (about ``1/sqrt(E)`` for isotropic embeddings, 0
        when collapsed); ``std_ratio``: ``std * sqrt(E)``.

    >>> groups = torch.tensor([0, 0, 1, 1])
    >>> s = embedding_spread(torch.eye(4), groups)
    >>> s["same_cos"], s["cross_cos"]
    (0.0, 0.0)
    >>> round(embedding_spread(torch.ones(4, 8), groups)["cross_cos"], 4)
    1.0
    """
    if emb.ndim != 2 or groups.shape != (emb.shape[0],):
        raise ValueError(f"emb must be (N, E) and groups (N,); got {tuple(emb.shape)} and "
                         f"{tuple(groups.shape)}")
    z = torch.nn.functional.normalize(emb.detach().float(), dim=1)
    n, dim = z.shape
    cos = z @ z.T
    groups = groups.to(z.device)
    same = groups[:, None] == groups[None, :]
    off = ~torch.eye(n, dtype=torch.bool, device=z.device)
    pos, neg = same & off, ~same

    def mean(mask: torch.Tensor) -> float:
        return float(cos[mask].mean()) if bool(mask.any()) else math.nan

    std = float(z.std(0, unbiased=False).mean()) if n > 1 else math.nan
    return {"same_cos": mean(pos), "cross_cos": mean(neg), "std": std,
            "std_ratio": std * math.sqrt(dim)}


def is_collapsed(spread: dict[str, float]) -> bool:
    """Whether :func:`embedding_spread`'s statistics say the embedding has collapsed.

    Collapsed: mean cross-group cosine above :data:`COLLAPSE_CROSS_COSINE`, or ``std_ratio``
    below :data:`COLLAPSE_STD_RATIO`.

    >>> is_collapsed({"cross_cos": 0.999, "std_ratio": 0.02})
    True
    >>> is_collapsed({"cross_cos": 0.1, "std_ratio": 0.9})
    False
    """
    cross, ratio = spread.get("cross_cos", math.nan), spread.get("std_ratio", math.nan)
    return bool(cross > COLLAPSE_CROSS_COSINE or ratio < COLLAPSE_STD_RATIO)
