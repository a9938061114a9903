"""RestorationLoss against explicit formulas, masks and errors."""

from __future__ import annotations

import pytest
import torch
from t3d_objectives import RestorationLoss


def _data():
    g = torch.Generator().manual_seed(0)
    restored = torch.randn(2, 1, 4, 5, 6, generator=g, dtype=torch.float64)
    target = torch.randn(2, 1, 4, 5, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 1, 4, 5, 6, generator=g) < 0.3
    return restored, target, mask


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_all_voxels_matches_loop_reference(kind):
    restored, target, mask = _data()
    total = 0.0
    for value_r, value_t in zip(restored.flatten().tolist(), target.flatten().tolist(), strict=True):
        total += abs(value_r - value_t) if kind == "l1" else (value_r - value_t) ** 2
    loss = RestorationLoss(kind)(restored, target, mask)  # mask ignored unless only_corrupted
    assert loss.item() == pytest.approx(total / restored.numel())


@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("float_mask", [False, True])
def test_only_corrupted_matches_reference(kind, float_mask):
    restored, target, mask = _data()
    err = (restored - target).abs() if kind == "l1" else (restored - target) ** 2
    expected = err[mask].mean()
    m = mask.double() if float_mask else mask
    torch.testing.assert_close(RestorationLoss(kind, only_corrupted=True)(restored, target, m), expected)


def test_gradcheck_and_empty_mask():
    restored, target, mask = _data()
    loss_fn = RestorationLoss("l2", only_corrupted=True)
    assert torch.autograd.gradcheck(lambda r: loss_fn(r, target, mask), (restored.requires_grad_(),))
    zero = loss_fn(restored, target, torch.zeros_like(mask))
    assert zero.item() == 0.0


def test_errors():
    with pytest.raises(ValueError, match=r"kind must be one of \('l1', 'l2'\); got 'huber'"):
        RestorationLoss("huber")
    restored, target, mask = _data()
    with pytest.raises(ValueError, match="same shape"):
        RestorationLoss()(restored, target[:, :, :2])
    with pytest.raises(ValueError, match="needs corruption_mask"):
        RestorationLoss(only_corrupted=True)(restored, target)
    with pytest.raises(ValueError, match="corruption_mask must have shape"):
        RestorationLoss(only_corrupted=True)(restored, target, mask[:, :, :2])
