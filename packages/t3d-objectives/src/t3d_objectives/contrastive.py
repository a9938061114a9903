"""Text-informed contrastive learning (TCL): multi-positive InfoNCE between text-informed and
visual-only crop embeddings (T3D, Liu et al. 2023, arXiv 2312.01529; see docs/objectives.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._common import (
    check_embeddings,
    check_groups,
    check_positive,
    gather_side,
    make_logit_scale,
    multi_positive_info_nce,
    normalize,
)
from .terms import Term, register_term

__all__ = ["TextInformedContrastiveLoss"]


class TextInformedContrastiveLoss(nn.Module):
    """Multi-positive InfoNCE between text-informed anchors ``x`` and visual-only targets ``v``.

    For N crops with report groups ``g``, cosine similarity ``sim`` and logit scale
    ``s = min(exp(logit_scale), max_logit_scale)`` (``s = 1/τ``)::

        L_TCL = -1/N Σ_a 1/|P(a)| Σ_{p∈P(a)} log( exp(s·sim(x_a, v_p)) / Σ_{b≠a} exp(s·sim(x_a, v_b)) )
        P(a)  = { b ≠ a : g(b) = g(a) }

    Every ordered positive pair ``(a, p)`` appears once with crop ``a`` as the text-informed
    anchor and once (as ``(p, a)``) with crop ``p`` as the anchor, so the loss is symmetric in the
    two crops of a pair. The softmax always runs over the visual targets: with a constant visual
    encoder (``v_b = v``) every logit of a row is equal and ``L_TCL = log(N-1)`` exactly, whatever
    the text — the text pathway cannot lower the loss on its own.

    ``symmetric=True`` adds the swapped direction (visual anchors ``v_a`` against text-informed
    targets ``x_b``, same positives) and returns the average of the two directions. That
    direction's softmax runs over ``x``, so with constant ``v`` it is *at least* ``log(N-1)``
    (Jensen; equality iff all ``sim(v, x_b)`` are equal) instead of exactly ``log(N-1)``: still no
    text shortcut below chance, but not text-independent. Hence the default ``False``.

    With ``gather_distributed=True`` each rank's anchors are scored against the targets of *all*
    ranks (gathered with gradient, see :func:`t3d_objectives.distributed.gather_with_grad`), and
    the returned value is the mean over this rank's anchors. With equal per-rank batches the mean
    of the per-rank losses equals the single-process loss on the concatenated batch, and the
    gradients reaching each rank's inputs are ``world_size`` times the single-process ones, so
    DDP's gradient *averaging* yields exactly the single-process parameter gradients (including
    this module's temperature). Group ids must be comparable across ranks (dataset-wide ids).

    Args:
        temperature: initial τ > 0 (logit scale ``log(1/τ)``).
        learnable_temperature: make ``logit_scale`` an ``nn.Parameter`` (else a buffer).
        gather_distributed: draw negatives from every rank.
        symmetric: average with the swapped (visual → text-informed) direction.
        max_logit_scale: clamp for ``exp(logit_scale)`` (100 as in CLIP).

    Shapes:
        text_informed: ``(N, D)`` anchors ``x``; visual: ``(N, D)`` targets ``v``; groups:
        ``(N,)`` integer report group per crop, any values, crops in any order. Returns a scalar.

    Raises:
        ValueError: non-positive temperature; shape/dtype mismatch; a group with a single crop
            (its crop has no positive — draw K >= 2 crops per study).

    >>> import torch
    >>> loss_fn = TextInformedContrastiveLoss()
    >>> x, v = torch.randn(8, 32), torch.randn(8, 32)
    >>> groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    >>> loss = loss_fn(x, v, groups)
    >>> loss.shape
    torch.Size([])
    >>> constant_v = torch.ones(8, 32)  # chance value log(N-1), whatever the text
    >>> torch.allclose(loss_fn(x, constant_v, groups), torch.tensor(7.0).log())
    True
    """

    def __init__(
        self,
        temperature: float = 0.07,
        learnable_temperature: bool = True,
        gather_distributed: bool = False,
        symmetric: bool = False,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        temperature = check_positive("temperature", temperature, " (try 0.07)")
        self.max_logit_scale = check_positive("max_logit_scale", max_logit_scale, " (try 100)")
        self.gather_distributed = bool(gather_distributed)
        self.symmetric = bool(symmetric)
        make_logit_scale(self, math.log(1.0 / temperature), learnable_temperature)

    def scale(self) -> torch.Tensor:
        """Current logit scale ``1/τ``, clamped at ``max_logit_scale``."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(
        self, text_informed: torch.Tensor, visual: torch.Tensor, groups: torch.Tensor
    ) -> torch.Tensor:
        check_embeddings("text_informed", text_informed, "visual", visual)
        check_groups("groups", groups, text_informed.shape[0], "text_informed")
        groups = groups.to(text_informed.device)
        x, v = normalize(text_informed), normalize(visual)
        v_all, g_all, offset = gather_side(v, groups, self.gather_distributed)
        _check_every_group_has_two(g_all)
        scale = self.scale()
        loss_x, _ = multi_positive_info_nce(x, v_all, groups, g_all, scale, offset, True)
        loss = loss_x.mean()
        if self.symmetric:
            x_all, _, _ = gather_side(x, groups, self.gather_distributed)
            loss_v, _ = multi_positive_info_nce(v, x_all, groups, g_all, scale, offset, True)
            loss = 0.5 * (loss + loss_v.mean())
        return loss

    def extra_repr(self) -> str:
        return (
            f"temperature={1.0 / self.scale().item():.4g}, "
            f"learnable={isinstance(self.logit_scale, nn.Parameter)}, "
            f"gather_distributed={self.gather_distributed}, symmetric={self.symmetric}"
        )


def _check_every_group_has_two(groups: torch.Tensor) -> None:
    values, counts = torch.unique(groups, return_counts=True)
    if bool((counts < 2).any()):
        single = values[counts < 2].tolist()
        index = int((groups == single[0]).nonzero()[0, 0])
        raise ValueError(
            f"group {single[0]} has a single crop (crop index {index}; groups with one crop: "
            f"{single[:10]}), so that crop has no positive for TCL; draw K >= 2 crops per study "
            "so every group appears at least twice in the (gathered) batch"
        )


def _tcl_chance(config: object, studies: int, crops: int) -> tuple[str, float] | None:
    """A constant visual embedding: ``log(N-1)`` over the N crops scored together."""
    return (f"log({crops - 1})", math.log(crops - 1)) if crops > 1 else None


#: The TCL term of :class:`~t3d_objectives.T3DObjective` (weight ``w_tcl``).
TCL_TERM = register_term(Term(
    name="tcl",
    weight_field="w_tcl",
    build=lambda c: TextInformedContrastiveLoss(
        c.temperature, c.learnable_temperature, c.gather_distributed, symmetric=c.tcl_symmetric
    ),
    inputs=("text_informed_emb", "visual_emb", "crop_group"),
    chance=_tcl_chance,
    order=10,
))
