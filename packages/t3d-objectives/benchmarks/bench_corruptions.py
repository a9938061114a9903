"""Benchmark CropCorruption (vectorised) against a naive per-block loop baseline, same run.

Usage: python packages/t3d-objectives/benchmarks/bench_corruptions.py [--device cuda] [--size 96]
Prints a table: ms per batch for dropout / shuffle / both, and the naive drop-out baseline that
adds one random block at a time with a slice assignment until the target fraction is reached.
"""

from __future__ import annotations

import argparse
import time

import torch
from t3d_objectives import CropCorruption


def naive_dropout(crops: torch.Tensor, g: torch.Generator, fraction=(0.1, 0.3)) -> torch.Tensor:
    """Baseline: per crop, per block Python loop with a coverage check after each block."""
    out, mask = crops.clone(), torch.zeros_like(crops, dtype=torch.bool)
    for n in range(crops.shape[0]):
        f = fraction[0] + (fraction[1] - fraction[0]) * torch.rand(1, generator=g).item()
        m = mask[n, 0]
        while m.float().mean().item() < f:
            box = []
            for size in m.shape:
                edge = int(torch.randint(max(1, size // 8), size // 4 + 1, (1,), generator=g))
                start = int(torch.randint(0, size - edge + 1, (1,), generator=g))
                box.append(slice(start, start + edge))
            m[tuple(box)] = True
        out[n, 0][m] = torch.randn(int(m.sum()), device=crops.device) * 0.1 + crops[n].mean()
    return out, mask


def timed(fn, device: str, repeat: int) -> float:
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, nargs="+", default=[64, 96])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"device={args.device} batch={args.batch} torch={torch.__version__}")
    print(f"| crop | {'dropout':>9} | {'shuffle':>9} | {'both':>9} | {'naive dropout (baseline)':>24} |")
    print("|---|---:|---:|---:|---:|")
    for size in args.size:
        crops = torch.rand(args.batch, 1, size, size, size, device=args.device)
        row = []
        for mode in ("dropout", "shuffle", "both"):
            corrupt = CropCorruption(mode=mode)
            g = torch.Generator().manual_seed(0)
            row.append(timed(lambda c=corrupt, g=g, x=crops: c(x, generator=g), args.device, args.repeat))
        g = torch.Generator().manual_seed(0)
        base = timed(lambda g=g, x=crops: naive_dropout(x, g), args.device, max(1, args.repeat // 2))
        print(f"| {size}³ | {row[0]:7.1f}ms | {row[1]:7.1f}ms | {row[2]:7.1f}ms | {base:22.1f}ms |")


if __name__ == "__main__":
    main()
