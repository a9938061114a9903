"""Projection heads proj_v, proj_x, proj_t onto the shared embedding space (T3D notation).

The default crop heads are BatchNorm MLPs (SimCLR / MoCo v3 projectors): mean-pooled
SwinUNETR bottleneck features of different crops have cosine 0.96-0.99 at initialisation,
and through a plain (Linear-GELU-Linear) head the contrastive losses fall fastest by making the
embedding constant -- the chance value log(N-1) -- instead of separating the crops. BatchNorm
removes the batch-shared component of every feature before and after the MLP, so a constant
embedding is no longer reachable. See docs/pretraining.md for the measurements.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["HEAD_KINDS", "GlobalBatchNorm1d", "ProjectionHead"]

#: Valid ``kind`` values of :class:`ProjectionHead`.
HEAD_KINDS = ("bn_mlp", "bn_hidden_mlp", "mlp", "linear")


def _distributed_world() -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics span every process of the default group.

    With one process it *is* ``nn.BatchNorm1d``. Under ``torch.distributed`` (any backend,
    gloo on CPU included -- ``nn.SyncBatchNorm`` accepts only accelerator tensors) the batch
    mean and variance are all-reduced with gradient (``torch.distributed.nn.functional``), so N
    processes with B rows each normalise exactly like one process with the N·B rows, forward
    and backward. Every process must call it in training mode at the same time. In eval mode
    the running statistics are used, as in ``nn.BatchNorm1d``.

    >>> bn = GlobalBatchNorm1d(4)
    >>> x = torch.randn(8, 4)
    >>> torch.allclose(bn(x), nn.functional.batch_norm(x, None, None, training=True))
    True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _distributed_world() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(x)
        c = x.shape[1]
        xf = x.float()
        count = xf.new_full((1,), float(x.shape[0]))
        stats = all_reduce(torch.cat([xf.sum(0), (xf * xf).sum(0), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        return y.to(x.dtype)


class ProjectionHead(nn.Sequential):
    """Projection to the shared embedding dimension.

    Kinds:
        ``"bn_mlp"`` (default): Linear-BN-ReLU-Linear-BN, the last BatchNorm without affine
        parameters (MoCo v3's projector). Needs >= 2 rows per training batch (all processes
        together): BatchNorm of one row is undefined.
        ``"bn_hidden_mlp"``: Linear-BN-ReLU-Linear (SimCLR's projector: BatchNorm in the hidden
        layer only).
        ``"mlp"``: Linear-GELU-Linear (CLIP-style; no batch statistics, so it suits the report
        head, which sees only B reports per process).
        ``"linear"``: one Linear layer.

    Args:
        in_dim: input width.
        embed_dim: output width E.
        kind: one of :data:`HEAD_KINDS`.
        hidden_dim: MLP hidden width (default ``in_dim``).
        bn_momentum: momentum of the BatchNorm running statistics (torch's default is 0.1).
            Eval mode normalises with them; when the weights move fast (short runs at a high
            head learning rate) 0.1 lags behind and the eval-mode embeddings bunch together
            (docs/pretraining.md), hence 0.5.

    Raises:
        ValueError: unknown ``kind``.

    >>> head = ProjectionHead(192, 128)
    >>> head(torch.randn(8, 192)).shape
    torch.Size([8, 128])
    """

    def __init__(
        self, in_dim: int, embed_dim: int = 256, kind: str = "bn_mlp", hidden_dim: int | None = None,
        bn_momentum: float = 0.5,
    ) -> None:
        if not 0 < bn_momentum <= 1:
            raise ValueError(f"bn_momentum must be in (0, 1]; got {bn_momentum}")
        m = bn_momentum
        hidden = hidden_dim or in_dim
        if kind == "linear":
            super().__init__(nn.Linear(in_dim, embed_dim))
        elif kind == "mlp":
            super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        elif kind == "bn_mlp":
            super().__init__(
                nn.Linear(in_dim, hidden, bias=False), GlobalBatchNorm1d(hidden, momentum=m),
                nn.ReLU(inplace=True), nn.Linear(hidden, embed_dim, bias=False),
                GlobalBatchNorm1d(embed_dim, affine=False, momentum=m),
            )
        elif kind == "bn_hidden_mlp":
            super().__init__(
                nn.Linear(in_dim, hidden, bias=False), GlobalBatchNorm1d(hidden, momentum=m),
                nn.ReLU(inplace=True), nn.Linear(hidden, embed_dim),
            )
        else:
            raise ValueError(f"head kind must be one of {HEAD_KINDS}; got {kind!r}")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind.startswith("bn_") and self.training and x.shape[0] < 2 and _distributed_world() == 1:
            raise ValueError(
                f"a 'bn_mlp' projection head needs >= 2 rows per training batch (BatchNorm); got "
                f"{x.shape[0]}. Use more crops/studies per batch, call model.eval() for inference, "
                "or build the model with head='mlp'")
        return super().forward(x)

