"""Rank helpers and an all-gather that keeps gradients, for negatives drawn from every rank.

Follows open_clip's ``gather_features(gather_with_grad=True)`` and lightly's ``utils/dist.py``.

Never use ``accelerator.gather`` (or ``torch.distributed.all_gather``) for contrastive
negatives: those gathers carry no gradient, so every rank would only back-propagate through its
own slice and the loss would silently train on a different objective than the single-process one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["rank", "world_size", "is_distributed", "gather_with_grad"]


def is_distributed() -> bool:
    """Whether a default process group is initialised (and has more than one member).

    Returns:
        ``True`` when ``torch.distributed`` is available, initialised and ``world_size() > 1``.

    >>> is_distributed()
    False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default group, ``0`` without a process group.

    >>> rank()
    0
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def world_size() -> int:
    """Number of processes in the default group, ``1`` without a process group.

    >>> world_size()
    1
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _check_equal_shapes(x: torch.Tensor) -> None:
    shape = torch.tensor(x.shape, dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    rows = [tuple(s.tolist()) for s in shapes]
    if any(r != rows[0] for r in rows):
        raise ValueError(
            f"gather_with_grad needs the same shape on every rank; got {rows} "
            "(rank order); use the same per-device batch size on every rank "
            "(e.g. drop_last=True in the DataLoader)"
        )


def _all_gather_autograd(x: torch.Tensor) -> torch.Tensor:
    try:  # functional collectives: traceable, reduce-scatter (sum) in backward
        from torch.distributed import _functional_collectives as fc
    except ImportError:  # pragma: no cover - very old torch
        fc = None
    fn = None
    if fc is not None:
        fn = getattr(fc, "all_gather_single_autograd", None) or getattr(
            fc, "all_gather_tensor_autograd", None
        )
    if fn is None:  # pragma: no cover - torch without functional collectives
        return _all_gather_nn(x)
    out = fn(x, 0, dist.group.WORLD)
    if isinstance(out, fc.AsyncCollectiveTensor):
        out = out.wait()
    return out


def _all_gather_nn(x: torch.Tensor) -> torch.Tensor:
    """Fallback: ``torch.distributed.nn.functional.all_gather`` (sums gradients in backward)."""
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of functional collectives
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x), dim=0)


def gather_with_grad(x: torch.Tensor, check_shapes: bool = True) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the autograd graph.

    Uses the functional-collectives autograd all-gather
    (``torch.distributed._functional_collectives.all_gather_single_autograd`` or, on older
    torch, ``all_gather_tensor_autograd``), falling back to
    ``torch.distributed.nn.functional.all_gather``. In backward, the gradient of the gathered
    tensor is *summed* over ranks and each rank receives the slice that belongs to its own
    input, so ``sum_r loss_r`` is differentiated exactly. Non-contiguous inputs are made
    contiguous first. Without a process group (or with one process) this is the identity.
    The first functional-collective call of a process imports torch's tracing stack (a one-time
    cost of a few seconds).

    Args:
        x: ``(n, ...)`` tensor on this rank; every rank must hold the same shape.
        check_shapes: all-gather the shapes first and raise a readable error if they differ
            (one tiny extra collective).

    Returns:
        ``(world_size * n, ...)`` tensor, rank 0's rows first; ``x`` itself when not distributed.

    Raises:
        ValueError: if ranks hold different shapes.

    >>> x = torch.randn(4, 8, requires_grad=True)
    >>> gather_with_grad(x) is x
    True
    """
    if not is_distributed():
        return x
    if check_shapes:
        _check_equal_shapes(x)
    return _all_gather_autograd(x.contiguous())


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (e.g. integer group ids) from every rank along dim 0, without autograd.

    >>> gather_no_grad(torch.tensor([3, 1]))
    tensor([3, 1])
    """
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
