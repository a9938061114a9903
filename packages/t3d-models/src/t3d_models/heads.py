"""Projection heads proj_v, proj_x, proj_t onto the shared embedding space (T3D notation)."""

from __future__ import annotations

from torch import nn

__all__ = ["ProjectionHead"]


class ProjectionHead(nn.Sequential):
    """Linear or MLP (Linear-GELU-Linear) projection to the shared embedding dimension.

    Args:
        in_dim: input width.
        embed_dim: output width E.
        kind: ``"mlp"`` or ``"linear"``.
        hidden_dim: MLP hidden width (default ``in_dim``).

    Raises:
        ValueError: unknown ``kind``.
    """

    def __init__(
        self, in_dim: int, embed_dim: int = 256, kind: str = "mlp", hidden_dim: int | None = None
    ) -> None:
        if kind == "linear":
            super().__init__(nn.Linear(in_dim, embed_dim))
        elif kind == "mlp":
            hidden = hidden_dim or in_dim
            super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        else:
            raise ValueError(f"head kind must be 'mlp' or 'linear'; got {kind!r}")
