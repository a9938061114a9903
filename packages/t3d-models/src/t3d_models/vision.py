"""SwinUNETR vision backbone for T3D: feature maps, visual tokens, pooled embedding, restoration.

Wraps ``monai.networks.nets.SwinUNETR`` (Hatamizadeh et al. 2022) without forking it: the network
lives in ``self.swin`` so its state-dict keys are the plain SwinUNETR keys under ``swin.``.
MONAI is imported lazily, on first construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import VisionConfig

__all__ = ["ATTENTION_KINDS", "DECODER_MODULES", "ENCODER_MODULES", "SwinUNETRBackbone",
           "VisionFeatures", "check_crop_size", "use_sdpa_attention"]

#: SwinUNETR submodules that make up the encoder (exported strictly to MONAI).
ENCODER_MODULES = ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10")
#: SwinUNETR submodules of the decoder (used for restoration; dropped when restoration=False).
DECODER_MODULES = ("decoder5", "decoder4", "decoder3", "decoder2", "decoder1", "out")

_MULTIPLE = 32  # patch_size ** 5 with SwinUNETR's patch size 2

#: Valid ``attention`` values of :class:`SwinUNETRBackbone`.
ATTENTION_KINDS = ("eager", "sdpa")


def _sdpa_window_attention(self: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """MONAI ``WindowAttention.forward`` with ``scaled_dot_product_attention``, with autograd.

    MONAI (1.6) takes the SDPA path only without autograd; this is the same computation for
    training: ``softmax(q k^T * scale + relative_position_bias [+ shift mask]) v``, the bias and
    mask added to the logits as SDPA's additive ``attn_mask`` (broadcast over the windows of a
    batch instead of materialised per window). Attention dropout is applied by SDPA.
    """
    b, n, c = x.shape
    h = self.num_heads
    qkv = self.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    index = self.relative_position_index[:n, :n].reshape(-1)
    bias = self.relative_position_bias_table[index].reshape(n, n, h).permute(2, 0, 1)  # (h, n, n)
    drop = self.attn_drop.p if self.training else 0.0
    if mask is None:
        y = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype), dropout_p=drop, scale=self.scale)
    else:
        nw = mask.shape[0]  # windows per image: (b // nw, nw, h, n, d) against (nw, h, n, n)
        full = (bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)).to(q.dtype)
        q, k, v = (t.reshape(b // nw, nw, h, n, c // h) for t in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full, dropout_p=drop,
                                                       scale=self.scale).reshape(b, h, n, c // h)
    return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, n, c)))


def _sdpa_class(cls: type) -> type:
    return type(f"SDPA{cls.__name__}", (cls,), {"forward": _sdpa_window_attention,
                                                "__module__": __name__})


_SDPA_CLASSES: dict[type, type] = {}


def use_sdpa_attention(module: nn.Module) -> int:
    """Switch every MONAI ``WindowAttention`` inside ``module`` to the SDPA forward, in place.

    The modules keep their parameters, buffers and state-dict keys (only their class changes,
    to a subclass whose ``forward`` is :func:`_sdpa_window_attention`), so checkpoints and the
    MONAI export are unaffected. Returns the number of attention modules switched.
    """
    from monai.networks.nets.swin_unetr import WindowAttention

    count = 0
    for m in module.modules():
        if isinstance(m, WindowAttention) and type(m) not in _SDPA_CLASSES.values():
            cls = type(m)
            if cls not in _SDPA_CLASSES:
                _SDPA_CLASSES[cls] = _sdpa_class(cls)
                globals()[_SDPA_CLASSES[cls].__name__] = _SDPA_CLASSES[cls]  # picklable by name
            m.__class__ = _SDPA_CLASSES[cls]
            count += 1
    return count


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
        attention: ``"eager"`` (MONAI's window attention) or ``"sdpa"``
            (:func:`use_sdpa_attention`: ``scaled_dot_product_attention``, same maths).
        channels_last: keep the convolution weights and the crops in ``channels_last_3d``
            memory format (same values).

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
        attention: str = "eager",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        from monai.networks.nets import SwinUNETR  # lazy: ~15 s import

        if token_stage not in (2, 3, 4):
            raise ValueError(f"token_stage must be 2, 3 or 4; got {token_stage}")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}; got {attention!r}")
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
        self.attention = attention
        if attention == "sdpa":
            use_sdpa_attention(self.swin)
        self.channels_last = channels_last
        if channels_last:
            self.swin.to(memory_format=torch.channels_last_3d)

    @classmethod
    def from_config(cls, vc: VisionConfig, restoration: bool = True) -> SwinUNETRBackbone:
        """The backbone a :class:`~t3d_models.config.VisionConfig` describes (every field that
        is a backbone argument), random weights."""
        return cls(feature_size=vc.feature_size, window_size=vc.window_size, depths=vc.depths,
                   num_heads=vc.num_heads, in_channels=vc.in_channels,
                   use_checkpoint=vc.use_checkpoint, use_v2=vc.use_v2, norm_name=vc.norm_name,
                   token_stage=vc.token_stage, restoration=restoration,
                   attention=vc.attention, channels_last=vc.channels_last)

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
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
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
