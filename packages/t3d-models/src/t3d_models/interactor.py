"""Cross-modal interactor: visual tokens attend to their own study's report tokens.

A stack of ``nn.TransformerDecoderLayer`` (batch_first, norm_first): visual tokens are the
queries, text tokens the keys/values (T3D, Liu et al. 2023, "interactor").
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Interactor"]


def _proj(d_in: int, d_out: int) -> nn.Module:
    return nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out)


class Interactor(nn.Module):
    """Transformer-decoder interactor producing text-informed visual tokens.

    Args:
        visual_dim: channels of the visual tokens (``16 * feature_size`` at the deepest stage).
        text_dim: hidden size of the text encoder.
        width: decoder width ``d_model``; linear projections are added where widths differ.
        depth: number of decoder layers.
        heads: attention heads (must divide ``width``).
        mlp_ratio: feed-forward width / ``width``.
        dropout: dropout inside the layers.

    Example:
        >>> it = Interactor(visual_dim=192, text_dim=384, width=192, depth=1, heads=4)
        >>> v, t = torch.rand(3, 8, 192), torch.rand(2, 5, 384)
        >>> mask = torch.ones(2, 5, dtype=torch.long)
        >>> x = it(v, t, mask, study_index=torch.tensor([0, 0, 1]))
        >>> tuple(x.shape), tuple(it.to_visual(x).shape)
        ((3, 8, 192), (3, 8, 192))
    """

    def __init__(
        self,
        visual_dim: int,
        text_dim: int,
        width: int = 768,
        depth: int = 1,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"interactor width {width} must be divisible by heads {heads}")
        self.width = width
        self.visual_in = _proj(visual_dim, width)
        self.text_in = _proj(text_dim, width)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(
                d_model=width,
                nhead=heads,
                dim_feedforward=int(width * mlp_ratio),
                dropout=dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.visual_out = _proj(width, visual_dim)

    def forward(
        self,
        visual_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        study_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text-informed tokens in the interactor width.

        Args:
            visual_tokens: ``(N, Lv, visual_dim)`` queries.
            text_tokens: ``(B, Lt, text_dim)`` keys/values, one row per study.
            attention_mask: ``(B, Lt)``, 1 for real tokens, 0 for padding.
            study_index: ``(N,)`` study of each crop; ``None`` means ``N == B`` row-aligned.

        Returns:
            ``(N, Lv, width)`` (normalised); use :meth:`to_visual` for the decoder.
        """
        if study_index is not None:
            text_tokens = text_tokens[study_index]
            attention_mask = attention_mask[study_index]
        if text_tokens.shape[0] != visual_tokens.shape[0]:
            raise ValueError(
                f"{visual_tokens.shape[0]} crops but {text_tokens.shape[0]} text rows; "
                "pass study_index"
            )
        pad = attention_mask == 0
        x = self.visual_in(visual_tokens)
        mem = self.text_in(text_tokens)
        for layer in self.layers:
            x = layer(x, mem, memory_key_padding_mask=pad)
        return self.norm(x)

    def to_visual(self, x: torch.Tensor) -> torch.Tensor:
        """Project interactor output ``(N, Lv, width)`` back to ``(N, Lv, visual_dim)``."""
        return self.visual_out(x)
