"""CropCorruption: fractions within bounds, local histogram-preserving shuffles, determinism,
devices, errors."""

from __future__ import annotations

import math

import pytest
import torch
from t3d_objectives import CropCorruption


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_dropout_fraction_within_bounds_and_noise_fill():
    crops = torch.rand(6, 1, 32, 32, 32, generator=_gen(1))
    corrupt = CropCorruption(drop_fraction=(0.1, 0.3), mode="dropout", noise_mean=5.0, noise_std=0.01)
    corrupted, mask = corrupt(crops, generator=_gen(2))
    assert mask.shape == crops.shape and mask.dtype == torch.bool
    frac = mask.flatten(1).float().mean(1)
    assert ((frac >= 0.1) & (frac <= 0.3)).all(), frac
    assert torch.equal(corrupted[~mask], crops[~mask])
    assert (corrupted[mask] - 5.0).abs().max() < 0.1  # filled with N(5, 0.01^2)


def test_dropout_blocks_are_boxes_of_one_eighth_to_one_quarter_per_axis():
    """The first block alone (tiny target): a box whose edges lie in [1/8, 1/4] of each axis."""
    corrupt = CropCorruption(drop_fraction=(0.0, 0.5), mode="dropout")
    spatial = (32, 48, 64)
    mask = corrupt._block_mask(16, spatial, torch.full((16,), 1e-9, dtype=torch.float64), _gen(3), torch.device("cpu"))
    for m in mask:
        box = [m.any(dim=tuple(a for a in range(3) if a != axis)).nonzero().flatten() for axis in range(3)]
        edges = [int(b.max() - b.min() + 1) for b in box]
        for edge, size in zip(edges, spatial, strict=True):
            assert round(size / 8) <= edge <= size // 4
        assert m.sum() == math.prod(edges)  # a full box


def test_shuffle_fraction_and_local_histograms():
    s = 4
    crops = torch.arange(4 * 32 * 32 * 32, dtype=torch.float32).view(4, 1, 32, 32, 32)
    corrupt = CropCorruption(mode="shuffle", shuffle_block_size=s, shuffle_fraction=(0.1, 0.3))
    corrupted, mask = corrupt(crops, generator=_gen(4))
    frac = mask.flatten(1).float().mean(1)
    assert ((frac >= 0.1) & (frac <= 0.3)).all(), frac
    assert torch.equal(corrupted[~mask], crops[~mask])
    for n in range(4):
        m = mask[n, 0]
        offset = [int(m.any(dim=tuple(a for a in range(3) if a != axis)).nonzero().min()) % s for axis in range(3)]
        region = tuple(slice(o, o + (32 - o) // s * s) for o in offset)
        cells_in = _cells(crops[n, 0][region], s)
        cells_out = _cells(corrupted[n, 0][region], s)
        # every cell keeps its histogram (values are unique, so the sets are equal)
        assert torch.equal(cells_in.sort(-1).values, cells_out.sort(-1).values)
        changed = (cells_in != cells_out).any(-1)
        assert changed.sum() > 0.9 * _cells(m[region].float(), s).amax(-1).sum()


def _cells(t, s):
    d, h, w = (x // s for x in t.shape)
    return t.reshape(d, s, h, s, w, s).permute(0, 2, 4, 1, 3, 5).reshape(-1, s**3)


@pytest.mark.parametrize("mode", ["both", "dropout", "shuffle"])
def test_same_seed_same_output(mode):
    crops = torch.rand(4, 1, 32, 32, 32, generator=_gen(5))
    corrupt = CropCorruption(mode=mode, shuffle_block_size=(2, 4))
    a = corrupt(crops, generator=_gen(7))
    b = corrupt(crops, generator=_gen(7))
    c = corrupt(crops, generator=_gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_both_mode_mixes_and_input_untouched():
    crops = torch.rand(16, 1, 32, 32, 32, generator=_gen(6))
    before = crops.clone()
    corrupted, mask = CropCorruption()(crops, generator=_gen(9))
    assert torch.equal(crops, before)
    # dropout crops have non-input values inside the mask, shuffled crops keep their multiset
    kept = [torch.equal(corrupted[i].flatten().sort().values, crops[i].flatten().sort().values) for i in range(16)]
    assert 0 < sum(kept) < 16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_contract():
    crops = torch.rand(4, 1, 64, 64, 64, device="cuda")
    corrupt = CropCorruption(shuffle_block_size=(2, 6))
    g = torch.Generator(device="cuda").manual_seed(0)
    corrupted, mask = corrupt(crops, generator=g)
    assert corrupted.device.type == "cuda" and mask.device.type == "cuda"
    frac = mask.flatten(1).float().mean(1)
    assert ((frac >= 0.1) & (frac <= 0.3)).all()
    again = corrupt(crops, generator=torch.Generator(device="cuda").manual_seed(0))
    assert torch.equal(corrupted, again[0])
    cpu_gen = corrupt(crops, generator=_gen(0))  # a CPU generator works for CUDA crops too
    assert cpu_gen[0].device.type == "cuda"


def test_real_crop_size_96_cubed():
    """At the t3d-base crop size (96^3, both corruptions): bounds hold, untouched voxels are kept.

    (Its speed is a benchmark, not a test: tools/bench_pretrain.py times whole steps.)
    """
    crops = torch.rand(2, 1, 96, 96, 96, generator=_gen(5))
    corrupt = CropCorruption()
    corrupted, mask = corrupt(crops, generator=_gen(0))
    frac = mask.flatten(1).float().mean(1)
    assert (frac > 0).all() and (frac <= 0.6).all(), frac  # dropout (<= 0.3) + shuffle (<= 0.3)
    assert torch.equal(corrupted[~mask], crops[~mask])
    assert not torch.equal(corrupted[mask], crops[mask])
    again, _ = corrupt(crops, generator=_gen(0))
    assert torch.equal(corrupted, again)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "cutout"}, r"mode must be one of \('both', 'dropout', 'shuffle'\); got 'cutout'"),
        ({"drop_fraction": (0.3, 0.1)}, r"drop_fraction must satisfy 0.0 <= min <= max"),
        ({"drop_fraction": 1.5}, "drop_fraction"),
        ({"max_block_fraction": 0}, r"max_block_fraction must be in \(0, 1\]; got 0"),
        ({"shuffle_block_size": 1}, r"shuffle_block_size must be an int >= 2.*got 1"),
        ({"shuffle_block_size": (4, 2)}, "shuffle_block_size"),
        ({"noise_std": -1.0}, "noise_std must be a finite number >= 0; got -1.0"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CropCorruption(**kwargs)


def test_input_errors():
    with pytest.raises(ValueError, match=r"crops must have shape \(N, 1, D, H, W\); got \(2, 32, 32, 32\)"):
        CropCorruption()(torch.rand(2, 32, 32, 32))
    with pytest.raises(ValueError, match="crops must be floating"):
        CropCorruption()(torch.zeros(1, 1, 8, 8, 8, dtype=torch.int16))
    with pytest.raises(ValueError, match="crop axis 2 has 3 voxels, smaller than shuffle_block_size 4"):
        CropCorruption(mode="shuffle")(torch.rand(1, 1, 8, 8, 3))
    assert math.isfinite(CropCorruption(mode="dropout")(torch.rand(1, 1, 8, 8, 3))[0].sum().item())
