"""Gathering evaluation embeddings from every process, without gradients.

Follows Accelerate's ``gather_for_metrics``: concatenate the per-rank results and drop the
samples a distributed sampler repeated to pad the last batch (truncate to the dataset length).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather_embeddings"]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _truncate(x: Tensor, num_samples: int | None) -> Tensor:
    if num_samples is None:
        return x
    if num_samples > x.shape[0]:
        raise ValueError(
            f"num_samples={num_samples} exceeds the {x.shape[0]} gathered rows; "
            "pass the dataset length, not a larger number"
        )
    return x[:num_samples]


@torch.no_grad()
def gather_embeddings(
    x: Tensor,
    num_samples: int | None = None,
    accelerator: Any | None = None,
    layout: Literal["interleaved", "contiguous"] = "interleaved",
) -> Tensor:
    """All-gather per-rank evaluation tensors and drop the padded duplicates.

    Without a process group (or with one process) ``x`` is returned, truncated to
    ``num_samples``. With ``accelerator`` given, ``accelerator.gather_for_metrics(x)`` does the
    work (call it once per batch inside an Accelerate-prepared loop, as Accelerate intends) and
    the result is truncated to ``num_samples`` if given.

    Otherwise the rows of every rank are gathered with ``torch.distributed.all_gather`` and put
    back in dataset order:

    - ``"interleaved"``: the layout of ``torch.utils.data.DistributedSampler(shuffle=False)``:
      rank ``r`` holds dataset items ``r, r + W, r + 2W, ...`` and the sampler pads the tail
      by repeating the first items. Every rank must hold the same number of rows.
    - ``"contiguous"``: rank ``r`` holds the ``r``-th consecutive block (ranks may differ in
      length); the result is the rank-major concatenation.

    The result is then truncated to ``num_samples`` (the dataset length), which removes the
    padded repeats. Every rank receives the full result.

    Args:
        x: ``(n_r, ...)`` rows computed on this rank.
        num_samples: dataset length; ``None`` keeps every gathered row.
        accelerator: an ``accelerate.Accelerator`` (optional).
        layout: how dataset items were assigned to ranks (see above).

    Returns:
        ``(num_samples, ...)`` tensor on ``x``'s device, in dataset order.

    Raises:
        ValueError: for an unknown layout, unequal rank sizes with ``"interleaved"``, or
            ``num_samples`` larger than the number of gathered rows.
    """
    if layout not in ("interleaved", "contiguous"):
        raise ValueError(f"layout must be 'interleaved' or 'contiguous'; got {layout!r}")
    x = x.detach()
    if accelerator is not None:
        return _truncate(accelerator.gather_for_metrics(x), num_samples)
    _, world = _world()
    if world == 1:
        return _truncate(x, num_samples)

    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    if layout == "interleaved" and len(set(counts)) != 1:
        raise ValueError(
            f"layout='interleaved' needs the same number of rows on every rank; got {counts}. "
            "DistributedSampler pads to equal sizes; use layout='contiguous' for blocks"
        )
    longest = max(counts)
    padded = x
    if x.shape[0] < longest:
        filler = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
        padded = torch.cat([x, filler])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    parts = [p[:n] for p, n in zip(parts, counts, strict=True)]
    if layout == "interleaved":
        # (W, n, ...) -> (n, W, ...) -> (n*W, ...): item r + i*W comes from rank r, row i.
        out = torch.stack(parts, dim=1).reshape(-1, *x.shape[1:])
    else:
        out = torch.cat(parts)
    return _truncate(out, num_samples)
