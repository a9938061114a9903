"""SwinUNETR vision backbone for T3D: feature maps, visual tokens, pooled embedding, restoration.

Wraps ``monai.networks.nets.SwinUNETR`` (Hatamizadeh et al. 2022) without forking it: the network
lives in ``self.swin`` so its state-dict keys are the plain SwinUNETR keys under ``swin.``.
MONAI is imported lazily, on first construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DECODER_MODULES", "ENCODER_MODULES", "SwinUNETRBackbone", "VisionFeatures",
           "check_crop_size"]

#: SwinUNETR submodules that make up the encoder (exported strictly to MONAI).
ENCODER_MODULES = ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10")
#: SwinUNETR submodules of the decoder (used for restoration; dropped when restoration=False).
DECODER_MODULES = ("decoder5", "decoder4", "decoder3", "decoder2", "decoder1", "out")

_MULTIPLE = 32  # patch_size ** 5 with SwinUNETR's patch size 2


def check_crop_size(spatial_shape: Sequence[int], multiple: int = _MULTIPLE) -> None:
    """Raise if a crop's spatial size is not a multiple of ``multiple`` in every dimension.

    Raises:
        ValueError: naming the first offending dimension, e.g. ``"crop size (80, 96, 96) must be
            a multiple of 32 in every dimension; got 80 in dim 0"``.
    """
    shape = tuple(int(s) for s in spatial_shape)
    for dim, size in enumerate(shape):
        if size <= 0 or size % multiple:
            raise ValueError(
                f"crop size {shape} must be a multiple of {multiple} in every dimension; "
                f"got {size} in dim {dim}"
            )


@dataclass
class VisionFeatures:
    """Encoder feature maps, named as in ``SwinUNETR.forward``.

    Attributes:
        hidden_states: the five ``swinViT`` outputs (normalised), strides 2, 4, 8, 16, 32.
        enc0: ``encoder1(x)`` (F channels, full resolution), or ``None`` when skips were skipped.
        enc1: ``encoder2(hidden_states[0])`` (F, 1/2).
        enc2: ``encoder3(hidden_states[1])`` (2F, 1/4).
        enc3: ``encoder4(hidden_states[2])`` (4F, 1/8).
        dec4: ``encoder10(hidden_states[4])`` (16F, 1/32): the bottleneck.
    """

    hidden_states: list[torch.Tensor]
    enc0: torch.Tensor | None
    enc1: torch.Tensor | None
    enc2: torch.Tensor | None
    enc3: torch.Tensor | None
    dec4: torch.Tensor


class SwinUNETRBackbone(nn.Module):
    """SwinUNETR encoder + (optional) restoration decoder with swappable bottleneck tokens.

    Args:
        feature_size: SwinUNETR ``feature_size`` (multiple of 12).
        window_size: Swin window size.
        depths: Swin blocks per stage.
        num_heads: heads per stage.
        in_channels: input channels.
        use_checkpoint: gradient checkpointing in the Swin blocks.
        use_v2: SwinUNETR-v2 residual conv blocks.
        norm_name: conv-block normalisation.
        token_stage: 4 (deepest, ``dec4``), 3 (``hidden_states[3]``) or 2 (``enc3``).
        restoration: keep ``decoder5..decoder1`` and ``out`` (``out_channels=1``).

    Example:
        >>> bb = SwinUNETRBackbone(feature_size=12, window_size=4)
        >>> tokens, grid = bb.tokens(bb.encode(torch.rand(1, 1, 64, 64, 64)))
        >>> tokens.shape, grid
        (torch.Size([1, 8, 192]), (2, 2, 2))
    """

    def __init__(
        self,
        feature_size: int = 48,
        window_size: int = 7,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        in_channels: int = 1,
        use_checkpoint: bool = False,
        use_v2: bool = False,
        norm_name: str = "instance",
        token_stage: int = 4,
        restoration: bool = True,
    ) -> None:
        super().__init__()
        from monai.networks.nets import SwinUNETR  # lazy: ~15 s import

        if token_stage not in (2, 3, 4):
            raise ValueError(f"token_stage must be 2, 3 or 4; got {token_stage}")
        self.feature_size = feature_size
        self.token_stage = token_stage
        self.restoration = restoration
        self.swin = SwinUNETR(
            in_channels=in_channels,
            out_channels=1,
            feature_size=feature_size,
            window_size=window_size,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            use_checkpoint=use_checkpoint,
            use_v2=use_v2,
            norm_name=norm_name,
        )
        if not restoration:
            for name in DECODER_MODULES:
                delattr(self.swin, name)

    @property
    def token_channels(self) -> int:
        """Channels of the visual tokens at ``token_stage``."""
        return {4: 16, 3: 8, 2: 4}[self.token_stage] * self.feature_size

    def encode(self, x: torch.Tensor, skips: bool = True) -> VisionFeatures:
        """Run the encoder exactly as ``SwinUNETR.forward`` does.

        Args:
            x: crops ``(N, C, D, H, W)``, each spatial size a multiple of 32.
            skips: compute ``enc0..enc3`` (needed for restoration or ``token_stage=2``).

        Raises:
            ValueError: spatial size not a multiple of 32 (names the dimension).
        """
        if x.ndim != 5:
            raise ValueError(f"crops must be (N, C, D, H, W); got shape {tuple(x.shape)}")
        check_crop_size(x.shape[2:])
        s = self.swin
        hidden = s.swinViT(x, s.normalize)
        need = skips or self.token_stage == 2
        enc0 = s.encoder1(x) if skips else None
        enc1 = s.encoder2(hidden[0]) if skips else None
        enc2 = s.encoder3(hidden[1]) if skips else None
        enc3 = s.encoder4(hidden[2]) if need else None
        dec4 = s.encoder10(hidden[4])
        return VisionFeatures(hidden, enc0, enc1, enc2, enc3, dec4)

    def token_map(self, feats: VisionFeatures) -> torch.Tensor:
        """The feature map ``(N, C, d, h, w)`` that provides the visual tokens."""
        if self.token_stage == 4:
            return feats.dec4
        if self.token_stage == 3:
            return feats.hidden_states[3]
        assert feats.enc3 is not None  # guaranteed by encode()
        return feats.enc3

    def tokens(self, feats: VisionFeatures) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Visual tokens ``(N, L, C)`` and their grid ``(d, h, w)`` (``L = d*h*w``)."""
        fmap = self.token_map(feats)
        grid = tuple(fmap.shape[2:])
        return fmap.flatten(2).transpose(1, 2), grid  # type: ignore[return-value]

    def pool(self, feats: VisionFeatures) -> torch.Tensor:
        """Pooled embedding ``(N, C)``: spatial mean of the token map."""
        return self.token_map(feats).mean(dim=(2, 3, 4))

    def restore(
        self,
        feats: VisionFeatures,
        tokens: torch.Tensor | None = None,
        grid: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        """Restore a crop with SwinUNETR's decoder, optionally from replaced (text-informed) tokens.

        Args:
            feats: encoder features from :meth:`encode` (with ``skips=True``).
            tokens: ``(N, L, C)`` tokens replacing the ``token_stage`` feature map; ``None`` keeps
                the encoder's own map (plain SwinUNETR decoding).
            grid: ``(d, h, w)`` of the tokens (from :meth:`tokens`).

        Returns:
            ``(N, 1, D, H, W)`` restored crops.
        """
        if not self.restoration:
            raise RuntimeError("restoration decoder was not built (restoration=False)")
        if feats.enc0 is None:
            raise ValueError("restore() needs encode(x, skips=True)")
        s = self.swin
        dec4, hs3, enc3 = feats.dec4, feats.hidden_states[3], feats.enc3
        if tokens is not None:
            if grid is None:
                raise ValueError("grid is required when tokens are given")
            fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
            if self.token_stage == 4:
                dec4 = fmap
            elif self.token_stage == 3:
                hs3 = fmap
            else:
                enc3 = fmap
        dec3 = s.decoder5(dec4, hs3)
        dec2 = s.decoder4(dec3, enc3)
        dec1 = s.decoder3(dec2, feats.enc2)
        dec0 = s.decoder2(dec1, feats.enc1)
        out = s.decoder1(dec0, feats.enc0)
        return s.out(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain SwinUNETR restoration of ``x`` (no text): ``(N, 1, D, H, W)``."""
        return self.restore(self.encode(x, skips=True))
