"""Shared argument checks and the multi-positive InfoNCE kernel used by TCL and alignment.

Private module: the public losses live in ``contrastive.py`` and ``alignment.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import gather_no_grad, gather_with_grad, rank


def check_positive(name: str, value: float, hint: str = "") -> float:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number > 0; got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}{hint}")
    return float(value)


def check_embeddings(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Two ``(N, D)`` floating tensors of the same shape."""
    for name, t in ((name_a, a), (name_b, b)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (N, D); got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(
                f"{name} must have shape (N, D); got {tuple(t.shape)} ({t.dim()} dims); "
                "pool/flatten the embeddings to one vector per item first"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor; got dtype {t.dtype}")
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape (N, D); "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] < 1:
        raise ValueError(f"{name_a} is empty (N = 0); the batch needs at least one item")


def check_groups(name: str, groups: torch.Tensor, n: int, of: str) -> None:
    """Integer ``(N,)`` group ids matching ``n`` rows of ``of``."""
    if not isinstance(groups, torch.Tensor):
        raise ValueError(f"{name} must be an integer torch.Tensor of shape (N,); got {type(groups).__name__}")
    if groups.dtype == torch.bool or groups.is_floating_point() or groups.is_complex():
        raise ValueError(
            f"{name} must hold integer group ids (e.g. torch.long); got dtype {groups.dtype}"
        )
    if groups.dim() != 1 or groups.shape[0] != n:
        raise ValueError(
            f"{name} must have shape (N,) = ({n},) to match {of}; got {tuple(groups.shape)}"
        )


def make_logit_scale(module: nn.Module, init: float, learnable: bool) -> None:
    """Register ``module.logit_scale`` as a parameter (learnable) or a buffer (fixed)."""
    value = torch.tensor(float(init))
    if learnable:
        module.logit_scale = nn.Parameter(value)
    else:
        module.register_buffer("logit_scale", value)


def gather_side(
    x: torch.Tensor, groups: torch.Tensor, enabled: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Gather embeddings (with grad) and groups (without) when ``enabled``; return the offset
    of this rank's rows in the gathered tensors."""
    if not enabled:
        return x, groups, 0
    return gather_with_grad(x), gather_no_grad(groups), rank() * x.shape[0]


def multi_positive_info_nce(
    anchors: torch.Tensor,
    targets: torch.Tensor,
    anchor_groups: torch.Tensor,
    target_groups: torch.Tensor,
    scale: torch.Tensor,
    offset: int,
    exclude_self: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor multi-positive InfoNCE on L2-normalised inputs.

    ``loss_a = -1/|P(a)| sum_{p in P(a)} log softmax_b(scale * <anchor_a, target_b>)[p]``, the
    softmax over every target (but anchor ``a``'s own, global index ``offset + a``, when
    ``exclude_self``), ``P(a)`` = targets of the same group (minus itself when ``exclude_self``).

    Returns:
        ``(losses (n,), positive counts (n,))``; anchors without positives get loss 0.
    """
    logits = scale * (anchors @ targets.T)  # (n, M)
    pos = anchor_groups[:, None] == target_groups[None, :]
    if exclude_self:
        n = anchors.shape[0]
        self_mask = torch.zeros_like(pos)
        idx = torch.arange(n, device=anchors.device)
        self_mask[idx, idx + offset] = True
        logits = logits.masked_fill(self_mask, float("-inf"))
        pos = pos & ~self_mask
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    n_pos = pos.sum(dim=1)
    per_anchor = -log_prob.masked_fill(~pos, 0.0).sum(dim=1) / n_pos.clamp_min(1)
    return per_anchor, n_pos


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
