"""Global volume ↔ report alignment (T3D v3): CLIP-style symmetric InfoNCE and the SigLIP
sigmoid variant, with positives by report group (Radford et al. 2021; Zhai et al. 2023).
"""

from __future__ import annotations

import difflib
import math

import torch
import torch.nn.functional as F
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

__all__ = ["AlignmentLoss", "SigmoidAlignmentLoss"]


class AlignmentLoss(nn.Module):
    """Symmetric multi-positive InfoNCE between volume embeddings ``e`` and report embeddings ``u``.

    For B studies with report groups ``g`` and logit scale ``s = min(exp(logit_scale), 100)``::

        L_v→t = -1/B Σ_a 1/|P(a)| Σ_{p∈P(a)} log( exp(s·sim(e_a, u_p)) / Σ_b exp(s·sim(e_a, u_b)) )
        L_t→v = the same with e and u swapped
        L     = (L_v→t + L_t→v) / 2,        P(a) = { b : g(b) = g(a) }  (includes a itself)

    Studies whose reports are identical share a group and are positives of each other rather
    than false negatives. With unique groups this is the CLIP loss.

    With ``gather_distributed=True`` the same convention as
    :class:`~t3d_objectives.TextInformedContrastiveLoss` holds: local anchors against gathered
    targets, mean over local anchors; the mean over ranks equals the single-process loss and
    DDP's gradient averaging gives the single-process gradients.

    Args:
        temperature: initial τ > 0 (logit scale ``log(1/τ)``).
        learnable_temperature: ``logit_scale`` is an ``nn.Parameter`` (else a buffer).
        gather_distributed: draw negatives from every rank.
        max_logit_scale: clamp for ``exp(logit_scale)``.

    Shapes:
        volume: ``(B, D)``; text: ``(B, D)``; groups: ``(B,)`` integer. Returns a scalar.

    Raises:
        ValueError: non-positive temperature; shape/dtype mismatch.

    >>> import torch
    >>> loss_fn = AlignmentLoss(temperature=0.07)
    >>> e, u = torch.randn(4, 16), torch.randn(4, 16)
    >>> loss_fn(e, u, torch.tensor([0, 1, 2, 1])).shape  # studies 1 and 3: same report
    torch.Size([])
    """

    def __init__(
        self,
        temperature: float = 0.07,
        learnable_temperature: bool = True,
        gather_distributed: bool = False,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        temperature = check_positive("temperature", temperature, " (try 0.07)")
        self.max_logit_scale = check_positive("max_logit_scale", max_logit_scale, " (try 100)")
        self.gather_distributed = bool(gather_distributed)
        make_logit_scale(self, math.log(1.0 / temperature), learnable_temperature)

    def scale(self) -> torch.Tensor:
        """Current logit scale ``1/τ``, clamped at ``max_logit_scale``."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(
        self, volume: torch.Tensor, text: torch.Tensor, groups: torch.Tensor
    ) -> torch.Tensor:
        check_embeddings("volume", volume, "text", text)
        check_groups("groups", groups, volume.shape[0], "volume")
        groups = groups.to(volume.device)
        e, u = normalize(volume), normalize(text)
        e_all, g_all, offset = gather_side(e, groups, self.gather_distributed)
        u_all, _, _ = gather_side(u, groups, self.gather_distributed)
        scale = self.scale()
        loss_v, _ = multi_positive_info_nce(e, u_all, groups, g_all, scale, offset, False)
        loss_t, _ = multi_positive_info_nce(u, e_all, groups, g_all, scale, offset, False)
        return 0.5 * (loss_v.mean() + loss_t.mean())


class SigmoidAlignmentLoss(nn.Module):
    """SigLIP pairwise sigmoid loss between volume and report embeddings, positives by group.

    With ``t = exp(logit_scale)`` (init ``log 10``) and bias ``β`` (init ``-10``)::

        z_ab = +1 if g(a) = g(b) else -1
        L    = -1/B Σ_a Σ_b log σ( z_ab · (t·sim(e_a, u_b) + β) )

    (the normalisation by B, not B², follows the SigLIP paper). The scale is not clamped.
    With ``gather_distributed=True`` each rank scores its own volumes against every rank's
    reports (each pair once) and divides by its local B; the mean over ranks equals the
    single-process loss and DDP's gradient averaging gives the single-process gradients.

    Args:
        scale: initial ``t > 0``.
        bias: initial ``β``.
        learnable: ``logit_scale`` and ``bias`` are ``nn.Parameter`` s (else buffers).
        gather_distributed: score against the reports of every rank.

    Shapes:
        volume: ``(B, D)``; text: ``(B, D)``; groups: ``(B,)`` integer. Returns a scalar.

    Raises:
        ValueError: non-positive scale; non-finite bias; shape/dtype mismatch.

    >>> import torch
    >>> loss_fn = SigmoidAlignmentLoss()
    >>> e, u = torch.randn(4, 16), torch.randn(4, 16)
    >>> loss_fn(e, u, torch.arange(4)).shape
    torch.Size([])
    """

    def __init__(
        self,
        scale: float = 10.0,
        bias: float = -10.0,
        learnable: bool = True,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        scale = check_positive("scale", scale, " (SigLIP uses 10)")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise ValueError(f"bias must be a finite number; got {bias!r} (SigLIP uses -10)")
        self.gather_distributed = bool(gather_distributed)
        make_logit_scale(self, math.log(scale), learnable)
        if learnable:
            self.bias = nn.Parameter(torch.tensor(float(bias)))
        else:
            self.register_buffer("bias", torch.tensor(float(bias)))

    def scale(self) -> torch.Tensor:
        """Current scale ``t = exp(logit_scale)``."""
        return self.logit_scale.exp()

    def forward(
        self, volume: torch.Tensor, text: torch.Tensor, groups: torch.Tensor
    ) -> torch.Tensor:
        check_embeddings("volume", volume, "text", text)
        check_groups("groups", groups, volume.shape[0], "volume")
        groups = groups.to(volume.device)
        e, u = normalize(volume), normalize(text)
        u_all, g_all, _ = gather_side(u, groups, self.gather_distributed)
        logits = self.scale() * (e @ u_all.T) + self.bias
        sign = (groups[:, None] == g_all[None, :]).to(logits.dtype) * 2 - 1
        return -F.logsigmoid(sign * logits).sum() / e.shape[0]


ALIGN_KINDS = ("infonce", "sigmoid")


def _check_align(config: object) -> None:
    kind = config.align_kind
    if kind not in ALIGN_KINDS:
        hint = difflib.get_close_matches(str(kind), ALIGN_KINDS, n=1)
        raise ValueError(
            f"align_kind must be one of {ALIGN_KINDS}; got {kind!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )


def _build_align(c: object) -> nn.Module:
    if c.align_kind == "infonce":
        return AlignmentLoss(c.align_temperature, c.learnable_temperature, c.gather_distributed)
    return SigmoidAlignmentLoss(c.sigmoid_scale, c.sigmoid_bias, c.learnable_temperature,
                                c.gather_distributed)


def _align_chance(config: object, studies: int, crops: int) -> tuple[str, float] | None:
    """InfoNCE with a constant embedding: ``log B`` over the B studies scored together (the
    sigmoid loss has no batch-only chance value: it depends on its learnt bias)."""
    if config.align_kind != "infonce" or studies < 1:
        return None
    return (f"log({studies})", math.log(studies))


#: The global alignment term of :class:`~t3d_objectives.T3DObjective` (weight ``w_align``).
ALIGN_TERM = register_term(Term(
    name="align",
    weight_field="w_align",
    build=_build_align,
    inputs=("volume_emb", "text_emb", "group"),
    chance=_align_chance,
    check=_check_align,
    order=30,
))
