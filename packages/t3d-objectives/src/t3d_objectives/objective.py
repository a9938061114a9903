"""The T3D pre-training objective: weighted TCL + TIR + global alignment over the model's output
dict (T3D, arXiv 2312.01529; v3 adds the alignment term). Presets are data, as in open_clip.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .alignment import AlignmentLoss, SigmoidAlignmentLoss
from .contrastive import TextInformedContrastiveLoss
from .restoration import RestorationLoss

__all__ = ["ObjectiveConfig", "PRESETS", "T3DObjective"]

_ALIGN_KINDS = ("infonce", "sigmoid")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Plain (torch-only) configuration of :class:`T3DObjective`; field = constructor argument.

    The training script may wrap it in a pydantic model; this package never imports pydantic.

    >>> ObjectiveConfig(w_align=0.0).w_tcl
    1.0
    """

    w_tcl: float = 1.0
    w_tir: float = 1.0
    w_align: float = 1.0
    temperature: float = 0.2
    learnable_temperature: bool = True
    gather_distributed: bool = False
    tcl_symmetric: bool = False
    align_kind: str = "infonce"
    align_temperature: float = 0.2
    sigmoid_scale: float = 10.0
    sigmoid_bias: float = -10.0
    restoration_kind: str = "l1"
    restore_only_corrupted: bool = False

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


PRESETS: dict[str, ObjectiveConfig] = {
    "t3d": ObjectiveConfig(),
    "t3d-v1": ObjectiveConfig(w_align=0.0),
}


class T3DObjective(nn.Module):
    """``L = w_tcl·L_TCL + w_tir·L_TIR + w_align·L_align`` over ``T3DModel``'s output dict.

    A term whose weight is 0 is neither built nor computed, and its key is **absent** from the
    returned dict (so a disabled term owns no parameters: no unused-parameter errors under
    DDP, nothing to log). The learnable temperatures live in this module's parameters: optimise
    ``objective.parameters()`` together with the model's.

    Args:
        w_tcl, w_tir, w_align: term weights (≥ 0, finite).
        temperature: initial TCL temperature; ``align_temperature``: initial alignment one
            (both 0.2, MoCo v3's value for BatchNorm projection heads: with the 8-crop batches
            of the CPU presets, 0.07 made the losses noisy and slower to fall; see
            docs/pretraining.md. The loss classes alone keep CLIP's 0.07).
        learnable_temperature: learn both InfoNCE temperatures (and the sigmoid scale/bias).
        gather_distributed: draw negatives from every rank (TCL and alignment).
        tcl_symmetric: see :class:`TextInformedContrastiveLoss` ``symmetric``.
        align_kind: ``"infonce"`` (:class:`AlignmentLoss`) or ``"sigmoid"``
            (:class:`SigmoidAlignmentLoss`, with ``sigmoid_scale``/``sigmoid_bias``).
        restoration_kind, restore_only_corrupted: :class:`RestorationLoss` options.

    Returns (forward):
        dict with ``"tcl_loss"``, ``"tir_loss"``, ``"align_loss"`` (each only when its weight is
        > 0; unweighted) and ``"loss"`` (the weighted total).

    Raises:
        ValueError: negative/non-finite weights, all weights 0, unknown ``align_kind``;
            in forward, TIR enabled but ``restored``/``target`` missing.

    >>> import torch
    >>> objective = T3DObjective.from_preset("t3d")
    >>> out = objective(
    ...     visual_emb=torch.randn(8, 16), text_informed_emb=torch.randn(8, 16),
    ...     crop_group=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
    ...     volume_emb=torch.randn(4, 16), text_emb=torch.randn(4, 16), group=torch.arange(4),
    ...     restored=torch.rand(8, 1, 8, 8, 8), target=torch.rand(8, 1, 8, 8, 8))
    >>> sorted(out)
    ['align_loss', 'loss', 'tcl_loss', 'tir_loss']
    """

    def __init__(
        self,
        w_tcl: float = 1.0,
        w_tir: float = 1.0,
        w_align: float = 1.0,
        temperature: float = 0.2,
        learnable_temperature: bool = True,
        gather_distributed: bool = False,
        tcl_symmetric: bool = False,
        align_kind: str = "infonce",
        align_temperature: float = 0.2,
        sigmoid_scale: float = 10.0,
        sigmoid_bias: float = -10.0,
        restoration_kind: str = "l1",
        restore_only_corrupted: bool = False,
    ) -> None:
        super().__init__()
        for name, w in (("w_tcl", w_tcl), ("w_tir", w_tir), ("w_align", w_align)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"{name} must be a finite number >= 0; got {w!r} (0 disables the term)")
        if w_tcl == 0 and w_tir == 0 and w_align == 0:
            raise ValueError("w_tcl, w_tir and w_align are all 0; enable at least one term")
        if align_kind not in _ALIGN_KINDS:
            hint = difflib.get_close_matches(str(align_kind), _ALIGN_KINDS, n=1)
            raise ValueError(
                f"align_kind must be one of {_ALIGN_KINDS}; got {align_kind!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        self.w_tcl, self.w_tir, self.w_align = float(w_tcl), float(w_tir), float(w_align)
        self.tcl: TextInformedContrastiveLoss | None = None
        self.tir: RestorationLoss | None = None
        self.align: nn.Module | None = None
        if self.w_tcl > 0:
            self.tcl = TextInformedContrastiveLoss(
                temperature, learnable_temperature, gather_distributed, symmetric=tcl_symmetric
            )
        if self.w_tir > 0:
            self.tir = RestorationLoss(restoration_kind, restore_only_corrupted)
        if self.w_align > 0:
            if align_kind == "infonce":
                self.align = AlignmentLoss(align_temperature, learnable_temperature, gather_distributed)
            else:
                self.align = SigmoidAlignmentLoss(
                    sigmoid_scale, sigmoid_bias, learnable_temperature, gather_distributed
                )

    @classmethod
    def from_config(cls, config: ObjectiveConfig) -> T3DObjective:
        """Build from an :class:`ObjectiveConfig` (or any object with the same attributes)."""
        if isinstance(config, ObjectiveConfig):
            return cls(**config.to_dict())
        fields = [f.name for f in dataclasses.fields(ObjectiveConfig)]
        return cls(**{name: getattr(config, name) for name in fields if hasattr(config, name)})

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> T3DObjective:
        """Build a preset (``"t3d"``: weights 1, 1, 1; ``"t3d-v1"``: ``w_align=0``), with
        keyword overrides of any :class:`ObjectiveConfig` field."""
        if name not in PRESETS:
            hint = difflib.get_close_matches(name, PRESETS, n=1)
            raise ValueError(
                f"unknown objective preset {name!r}; choose one of {sorted(PRESETS)}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        try:
            config = dataclasses.replace(PRESETS[name], **overrides)
        except TypeError as err:
            raise ValueError(f"bad override for preset {name!r}: {err}") from None
        return cls.from_config(config)

    def forward(
        self,
        visual_emb: torch.Tensor,
        text_informed_emb: torch.Tensor,
        crop_group: torch.Tensor,
        volume_emb: torch.Tensor,
        text_emb: torch.Tensor,
        group: torch.Tensor,
        restored: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        corruption_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        total = None
        if self.tcl is not None:
            out["tcl_loss"] = self.tcl(text_informed_emb, visual_emb, crop_group)
            total = self.w_tcl * out["tcl_loss"]
        if self.tir is not None:
            if restored is None or target is None:
                raise ValueError(
                    f"w_tir={self.w_tir} but restored/target were not given; pass corrupted= "
                    "to the model (so it restores) or set w_tir=0"
                )
            out["tir_loss"] = self.tir(restored, target, corruption_mask)
            term = self.w_tir * out["tir_loss"]
            total = term if total is None else total + term
        if self.align is not None:
            out["align_loss"] = self.align(volume_emb, text_emb, group)
            term = self.w_align * out["align_loss"]
            total = term if total is None else total + term
        out["loss"] = total
        return out

    def extra_repr(self) -> str:
        return f"w_tcl={self.w_tcl}, w_tir={self.w_tir}, w_align={self.w_align}"
