"""Crop corruptions for text-informed restoration: block drop-out filled with noise and local
voxel shuffling (T3D; MONAI's RandCoarseDropout / RandCoarseShuffle as in SwinUNETR SSL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["CropCorruption"]

_MODES = ("both", "dropout", "shuffle")
_BITS = 62  # blocks per int64 word (bit 63 is the sign bit)
_CHUNK_VOXELS = 1 << 23  # bound the (n, D, H, W) int64 working set


def _range(name: str, value: float | Sequence[float], low: float, high: float) -> tuple[float, float]:
    pair = (value, value) if isinstance(value, (int, float)) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in pair):
        raise ValueError(f"{name} must be a number or a (min, max) pair; got {value!r}")
    lo, hi = float(pair[0]), float(pair[1])
    if not (low <= lo <= hi <= high):
        raise ValueError(f"{name} must satisfy {low} <= min <= max <= {high}; got {value!r}")
    return lo, hi


class CropCorruption(nn.Module):
    """Corrupt a batch of crops for restoration; returns ``(corrupted, mask)``.

    Per crop, ``mode="both"`` picks one corruption at random (probability 1/2 each):

    * **drop-out**: random axis-aligned blocks, edges drawn uniformly in
      ``[min_block_fraction, max_block_fraction]`` of each axis, are filled with Gaussian noise
      ``N(μ, noise_std²)`` (``μ`` = ``noise_mean``, or the crop's own mean when ``None``). Blocks
      are added until their union covers a fraction ``f ~ U(drop_fraction)`` of the voxels; the
      union never exceeds ``max(drop_fraction)`` and reaches ``min(drop_fraction)`` whenever the
      range is wider than one block (it is, by default: blocks ≤ 1/64 of the crop).
    * **shuffle**: the crop is tiled into ``s³`` cells (``s`` drawn from ``shuffle_block_size``
      per crop; the grid has a random offset per call), a fraction ``f ~ U(shuffle_fraction)``
      of the voxels' worth of cells is chosen and the voxels inside each chosen cell are randomly
      permuted, so every cell keeps its histogram.

    ``mask`` is ``True`` on every voxel inside a corrupted region (a dropped block or a shuffled
    cell); a shuffled voxel may keep its value when its neighbours are equal. Fully vectorised:
    drop-out places up to 62 blocks per pass as an int64 bitset per axis and keeps, per voxel,
    the first block covering it; shuffling is one ``argsort`` per chosen cell batch. All
    randomness derives from one seed drawn from ``generator`` (any device), so the same
    generator state gives the same output on the same device.

    Args:
        drop_fraction: fraction (or ``(min, max)``) of voxels to drop, in ``[0, 1)``.
        max_block_fraction: largest block edge as a fraction of each axis, in ``(0, 1]``.
        min_block_fraction: smallest block edge; ``None`` = half of ``max_block_fraction``.
        shuffle_block_size: cell edge in voxels (int ≥ 2) or an inclusive ``(min, max)`` range.
        shuffle_fraction: fraction (or ``(min, max)``) of voxels to shuffle, in ``[0, 1)``.
        mode: ``"both"``, ``"dropout"`` or ``"shuffle"``.
        noise_std: standard deviation of the drop-out fill (≥ 0).
        noise_mean: mean of the drop-out fill; ``None`` = each crop's mean.

    Shapes:
        crops: ``(N, 1, D, H, W)`` floating. Returns ``corrupted`` of the same shape and dtype and
        ``mask`` ``(N, 1, D, H, W)`` bool.

    Raises:
        ValueError: bad option values; crops not ``(N, 1, D, H, W)`` floating; an axis smaller
            than the shuffle cell.

    >>> import torch
    >>> corrupt = CropCorruption(mode="dropout")
    >>> crops = torch.rand(2, 1, 32, 32, 32)
    >>> corrupted, mask = corrupt(crops, generator=torch.Generator().manual_seed(0))
    >>> corrupted.shape, mask.dtype
    (torch.Size([2, 1, 32, 32, 32]), torch.bool)
    >>> bool(0.1 <= mask[0].float().mean() <= 0.3)
    True
    """

    def __init__(
        self,
        drop_fraction: float | Sequence[float] = (0.1, 0.3),
        max_block_fraction: float = 0.25,
        min_block_fraction: float | None = None,
        shuffle_block_size: int | Sequence[int] = 4,
        shuffle_fraction: float | Sequence[float] = (0.1, 0.3),
        mode: str = "both",
        noise_std: float = 0.1,
        noise_mean: float | None = None,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}; got {mode!r}")
        self.mode = mode
        self.drop_fraction = _range("drop_fraction", drop_fraction, 0.0, 0.999)
        self.shuffle_fraction = _range("shuffle_fraction", shuffle_fraction, 0.0, 0.999)
        if isinstance(max_block_fraction, bool) or not (0.0 < float(max_block_fraction) <= 1.0):
            raise ValueError(f"max_block_fraction must be in (0, 1]; got {max_block_fraction!r} (try 0.25)")
        self.max_block_fraction = float(max_block_fraction)
        if min_block_fraction is None:
            min_block_fraction = self.max_block_fraction / 2
        if not (0.0 < float(min_block_fraction) <= self.max_block_fraction):
            raise ValueError(
                f"min_block_fraction must be in (0, max_block_fraction={self.max_block_fraction}]; "
                f"got {min_block_fraction!r}"
            )
        self.min_block_fraction = float(min_block_fraction)
        sizes = (shuffle_block_size,) * 2 if isinstance(shuffle_block_size, int) else tuple(shuffle_block_size)
        if len(sizes) != 2 or any(isinstance(s, bool) or not isinstance(s, int) for s in sizes) or not (2 <= sizes[0] <= sizes[1]):
            raise ValueError(
                f"shuffle_block_size must be an int >= 2 or an inclusive (min, max) range of such "
                f"ints; got {shuffle_block_size!r} (try 4)"
            )
        self.shuffle_block_size = (int(sizes[0]), int(sizes[1]))
        if isinstance(noise_std, bool) or not (float(noise_std) >= 0.0 and math.isfinite(noise_std)):
            raise ValueError(f"noise_std must be a finite number >= 0; got {noise_std!r}")
        self.noise_std = float(noise_std)
        self.noise_mean = None if noise_mean is None else float(noise_mean)

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, drop_fraction={self.drop_fraction}, "
            f"block_fraction=({self.min_block_fraction}, {self.max_block_fraction}), "
            f"shuffle_block_size={self.shuffle_block_size}, shuffle_fraction={self.shuffle_fraction}, "
            f"noise_std={self.noise_std}, noise_mean={self.noise_mean}"
        )

    @torch.no_grad()
    def forward(
        self, crops: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(crops, torch.Tensor) or crops.dim() != 5 or crops.shape[1] != 1:
            shape = tuple(crops.shape) if isinstance(crops, torch.Tensor) else type(crops).__name__
            raise ValueError(f"crops must have shape (N, 1, D, H, W); got {shape}")
        if not crops.is_floating_point():
            raise ValueError(f"crops must be floating (scale intensities first); got dtype {crops.dtype}")
        n, spatial, device = crops.shape[0], tuple(crops.shape[2:]), crops.device
        if self.mode != "dropout":
            smax = self.shuffle_block_size[1]
            for axis, size in enumerate(spatial):
                if size < smax:
                    raise ValueError(
                        f"crop axis {axis} has {size} voxels, smaller than shuffle_block_size "
                        f"{smax}; use larger crops or a smaller shuffle_block_size"
                    )
        g_cpu, g_dev = _generators(generator, device)
        if self.mode == "both":
            use_drop = torch.rand(n, generator=g_cpu) < 0.5
        else:
            use_drop = torch.full((n,), self.mode == "dropout")
        drop_f = _uniform(n, self.drop_fraction, g_cpu)
        shuffle_f = _uniform(n, self.shuffle_fraction, g_cpu)
        lo, hi = self.shuffle_block_size
        cell = torch.randint(lo, hi + 1, (n,), generator=g_cpu)

        corrupted = crops.clone()
        mask = torch.zeros(crops.shape, dtype=torch.bool, device=device)
        drop_idx = use_drop.nonzero().flatten()
        if len(drop_idx):
            self._dropout(crops, corrupted, mask, drop_idx, drop_f[drop_idx], g_cpu, g_dev)
        shuf_idx = (~use_drop).nonzero().flatten()
        for s in cell[shuf_idx].unique().tolist():
            idx = shuf_idx[cell[shuf_idx] == s]
            self._shuffle(corrupted, mask, idx, shuffle_f[idx], s, g_cpu, g_dev)
        return corrupted, mask

    # -- drop-out ------------------------------------------------------------------------------
    def _dropout(self, crops, corrupted, mask, idx, fractions, g_cpu, g_dev) -> None:
        spatial = tuple(crops.shape[2:])
        voxels = math.prod(spatial)
        chunk = max(1, _CHUNK_VOXELS // voxels)
        for start in range(0, len(idx), chunk):
            part = idx[start : start + chunk]
            block_mask = self._block_mask(len(part), spatial, fractions[start : start + chunk], g_cpu, crops.device)
            dev_part = part.to(crops.device)
            sub = crops[dev_part]
            mean = sub.flatten(1).mean(1).view(-1, 1, 1, 1, 1) if self.noise_mean is None else self.noise_mean
            noise = torch.randn(sub.shape, generator=g_dev, device=sub.device, dtype=sub.dtype)
            fill = mean + self.noise_std * noise
            m = block_mask[:, None]
            corrupted[dev_part] = torch.where(m, fill, sub)
            mask[dev_part] = m

    def _block_mask(self, n, spatial, fractions, g_cpu, device) -> torch.Tensor:
        """``(n, D, H, W)`` bool: union of the first k_i random blocks, k_i chosen per crop."""
        voxels = math.prod(spatial)
        never = torch.iinfo(torch.int32).max
        first = torch.full((n, *spatial), never, dtype=torch.int32, device=device)
        target = fractions.to(device)
        weights = torch.ones((), dtype=torch.long, device=device) << torch.arange(_BITS, device=device)
        words = 0
        while True:
            axis_bits = []
            for size in spatial:
                lo = max(1, round(self.min_block_fraction * size))
                hi = max(lo, min(size, math.floor(self.max_block_fraction * size)))
                edge = torch.randint(lo, hi + 1, (n, _BITS), generator=g_cpu)
                begin = (torch.rand(n, _BITS, generator=g_cpu) * (size - edge + 1)).long()
                edge, begin = edge.to(device), begin.to(device)
                coord = torch.arange(size, device=device)
                inside = (coord >= begin[..., None]) & (coord < (begin + edge)[..., None])  # (n, M, size)
                axis_bits.append((inside.long() * weights[:, None]).sum(1))  # (n, size)
            bd, bh, bw = axis_bits
            bits = bd[:, :, None, None] & bh[:, None, :, None] & bw[:, None, None, :]
            low = bits & -bits  # lowest set bit = first block of this word covering the voxel
            # exponent of the (exact) float32 power of two: 127 + bit index, 0 when uncovered
            exponent = low.float().view(torch.int32) >> 23
            index = exponent + (words * _BITS - 127)
            index.masked_fill_(exponent == 0, never)
            torch.minimum(first, index, out=first)  # earlier words keep their smaller indices
            words += 1
            covered = (first != never).flatten(1).sum(1).double() / voxels
            if words >= 64 or bool((covered >= target).all()):
                break
        total = words * _BITS
        flat = first.flatten(1).clamp_max(total)
        rows = torch.arange(n, device=device, dtype=torch.int32)[:, None] * (total + 1)
        hist = torch.bincount((flat + rows).flatten(), minlength=n * (total + 1)).view(n, total + 1)
        cov = torch.cat([hist.new_zeros(n, 1), hist[:, :total].cumsum(1)], 1).double() / voxels
        k = (cov < target[:, None]).sum(1).clamp_max(total)  # smallest k with cov(k) >= f
        over = cov.gather(1, k[:, None])[:, 0] > self.drop_fraction[1] + 1e-12
        k = torch.where(over, k - 1, k)
        return first < k.view(n, 1, 1, 1)

    # -- shuffle -------------------------------------------------------------------------------
    def _shuffle(self, corrupted, mask, idx, fractions, s, g_cpu, g_dev) -> None:
        device = corrupted.device
        spatial = tuple(corrupted.shape[2:])
        voxels = math.prod(spatial)
        offset = [int(torch.randint(0, min(s, size - s + 1), (1,), generator=g_cpu)) for size in spatial]
        counts = [(size - o) // s for size, o in zip(spatial, offset, strict=True)]
        nd, nh, nw = counts
        n_cells = nd * nh * nw
        lo_cells = math.ceil(self.shuffle_fraction[0] * voxels / s**3 - 1e-9)
        want = (fractions * voxels / s**3 + 1e-9).floor().long().clamp_min(lo_cells).clamp_max(n_cells)
        window = tuple(slice(o, o + c * s) for o, c in zip(offset, counts, strict=True))
        dev_idx = idx.to(device)
        region = corrupted[dev_idx][:, 0][(slice(None), *window)]
        m = len(idx)
        cells = region.reshape(m, nd, s, nh, s, nw, s).permute(0, 1, 3, 5, 2, 4, 6).reshape(m, n_cells, s**3)
        keys = torch.rand(m, n_cells, generator=g_dev, device=device)
        rank = keys.argsort(1).argsort(1)
        chosen = rank < want.to(device)[:, None]  # (m, n_cells)
        rows = cells[chosen]
        perm = torch.rand(rows.shape, generator=g_dev, device=device).argsort(1)
        cells[chosen] = rows.gather(1, perm)

        def back(t: torch.Tensor) -> torch.Tensor:
            t = t.reshape(m, nd, nh, nw, s, s, s).permute(0, 1, 4, 2, 5, 3, 6)
            return t.reshape(m, nd * s, nh * s, nw * s)

        out = corrupted[dev_idx]
        out[(slice(None), 0, *window)] = back(cells)
        corrupted[dev_idx] = out
        cell_mask = torch.zeros(m, 1, *spatial, dtype=torch.bool, device=device)
        cell_mask[(slice(None), 0, *window)] = back(chosen[..., None].expand(m, n_cells, s**3))
        mask[dev_idx] = cell_mask


def _uniform(n: int, bounds: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _generators(
    generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Generator, torch.Generator]:
    """A CPU generator for the plan and one on ``device`` for noise, both from one seed."""
    if generator is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    else:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    g_cpu = torch.Generator().manual_seed(seed)
    if device.type == "cpu":
        return g_cpu, g_cpu
    return g_cpu, torch.Generator(device=device).manual_seed(seed)
