"""Text-informed image restoration (TIR) loss: L1/L2 between the restored and the clean crop,
over all voxels or only the corrupted ones (T3D; SwinUNETR SSL inpainting, Tang et al. 2022).
"""

from __future__ import annotations

import torch
from torch import nn

from .terms import Term, register_term

__all__ = ["RestorationLoss"]

_KINDS = ("l1", "l2")


class RestorationLoss(nn.Module):
    """Voxel-wise restoration loss.

    With ``d = restored − target`` and ``ρ(d) = |d|`` (``"l1"``) or ``d²`` (``"l2"``)::

        only_corrupted=False:  L = mean over all voxels of ρ(d)
        only_corrupted=True:   L = Σ m·ρ(d) / max(Σ m, 1),   m = corruption_mask

    (a batch without corrupted voxels gives 0 in the second form).

    Args:
        kind: ``"l1"`` or ``"l2"``.
        only_corrupted: average over the corrupted voxels only (needs ``corruption_mask``).

    Shapes:
        restored, target: ``(N, C, D, H, W)`` (any shape, but equal); corruption_mask: same
        shape as ``target`` (bool or float in [0, 1]), or ``(N, 1, D, H, W)`` when ``C > 1``.
        Returns a scalar.

    Raises:
        ValueError: unknown ``kind``; shape mismatch; ``only_corrupted=True`` without a mask.

    >>> import torch
    >>> loss_fn = RestorationLoss("l1", only_corrupted=True)
    >>> target = torch.zeros(1, 1, 4, 4, 4)
    >>> restored = torch.ones(1, 1, 4, 4, 4)
    >>> mask = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    >>> mask[..., :2] = True
    >>> loss_fn(restored, target, mask)
    tensor(1.)
    """

    def __init__(self, kind: str = "l1", only_corrupted: bool = False) -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}; got {kind!r}")
        self.kind = kind
        self.only_corrupted = bool(only_corrupted)

    def forward(
        self,
        restored: torch.Tensor,
        target: torch.Tensor,
        corruption_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if restored.shape != target.shape:
            raise ValueError(
                f"restored and target must have the same shape; got {tuple(restored.shape)} "
                f"and {tuple(target.shape)} (restore the crop at its input resolution)"
            )
        diff = restored - target.to(restored.dtype)
        err = diff.abs() if self.kind == "l1" else diff.square()
        if not self.only_corrupted:
            return err.mean()
        if corruption_mask is None:
            raise ValueError(
                "only_corrupted=True needs corruption_mask (from CropCorruption); "
                "pass it or use only_corrupted=False"
            )
        m = corruption_mask
        if m.dim() != target.dim() or m.shape[0] != target.shape[0] or m.shape[2:] != target.shape[2:] or m.shape[1] not in (1, target.shape[1]):
            raise ValueError(
                f"corruption_mask must have shape {tuple(target.shape)} (or one channel); "
                f"got {tuple(m.shape)}"
            )
        m = m.to(err.dtype).expand_as(err)
        return (err * m).sum() / m.sum().clamp_min(1.0)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, only_corrupted={self.only_corrupted}"


#: The TIR term of :class:`~t3d_objectives.T3DObjective` (weight ``w_tir``; no chance value).
TIR_TERM = register_term(Term(
    name="tir",
    weight_field="w_tir",
    build=lambda c: RestorationLoss(c.restoration_kind, c.restore_only_corrupted),
    inputs=("restored", "target"),
    optional_inputs=("corruption_mask",),
    missing_hint="pass corrupted= to the model (so it restores)",
    order=20,
))
