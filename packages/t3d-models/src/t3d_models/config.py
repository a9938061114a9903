"""Configuration models and the JSON preset registry for T3D models.

Configs are pydantic v2 models (``extra="forbid"``), one per tower; presets are small JSON files
in ``t3d_models/presets`` (the open_clip ``model_configs`` pattern). Importing this module never
imports MONAI or transformers.
"""

from __future__ import annotations

import difflib
import json
from importlib import resources
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "INTENSITY_POLICIES",
    "InteractorConfig",
    "PreprocessingConfig",
    "T3DModelConfig",
    "TextConfig",
    "VisionConfig",
    "list_presets",
    "load_preset",
]

_PRESET_PACKAGE = "t3d_models.presets"

#: The intensity policies of :attr:`PreprocessingConfig.intensity`: CT HU window, MRI z-score.
INTENSITY_POLICIES = ("hu_window_linear", "zscore_foreground")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class VisionConfig(_Strict):
    """SwinUNETR vision tower (``monai.networks.nets.SwinUNETR``) options.

    Attributes:
        feature_size: SwinUNETR embedding width; a multiple of 12. Bottleneck channels are
            ``16 * feature_size``.
        window_size: Swin local window (4 keeps 64³ crops cheap; 7 is MONAI's default).
        depths: Swin blocks per stage.
        num_heads: attention heads per stage.
        in_channels: image channels (1 for CT).
        use_checkpoint: gradient checkpointing inside the Swin blocks.
        use_v2: SwinUNETR-v2 (residual conv block at the start of each stage).
        norm_name: normalisation of the conv blocks (MONAI ``norm_name``).
        crop_size: crop size the model is trained on; every dimension a multiple of 32.
        token_stage: which feature map gives the visual tokens: 4 = deepest (``encoder10``
            output, 16F channels at 1/32), 3 = ``hidden_states[3]`` (8F at 1/16),
            2 = ``encoder4`` output (4F at 1/8).
        attention: Swin window attention: ``"eager"`` (MONAI's matmul + softmax) or ``"sdpa"``
            (``torch.nn.functional.scaled_dot_product_attention`` with the relative-position
            bias and shift mask as an additive mask, in training too; same maths, tested equal
            within 1e-5; on a GPU it selects a fused kernel and never stores the attention
            matrix). Weights are the same either way (docs/performance.md).
        channels_last: run the convolutions in ``torch.channels_last_3d`` memory format (same
            values; tested equal within 1e-5; see docs/performance.md for when it is faster).
    """

    feature_size: int = 48
    window_size: int = 7
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    num_heads: tuple[int, int, int, int] = (3, 6, 12, 24)
    in_channels: int = 1
    use_checkpoint: bool = False
    use_v2: bool = False
    norm_name: str = "instance"
    crop_size: tuple[int, int, int] = (96, 96, 96)
    token_stage: Literal[2, 3, 4] = 4
    attention: Literal["eager", "sdpa"] = "eager"
    channels_last: bool = False

    @field_validator("feature_size")
    @classmethod
    def _feature_size_multiple_of_12(cls, v: int) -> int:
        if v <= 0 or v % 12:
            raise ValueError(f"feature_size must be a positive multiple of 12; got {v}")
        return v

    @field_validator("crop_size")
    @classmethod
    def _crop_multiple_of_32(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        for dim, size in enumerate(v):
            if size <= 0 or size % 32:
                raise ValueError(
                    f"crop size {tuple(v)} must be a multiple of 32 in every dimension; "
                    f"got {size} in dim {dim}"
                )
        return v


class TextConfig(_Strict):
    """Hugging Face text tower options.

    Attributes:
        model_name_or_path: hub id (e.g. ``StanfordAIMI/RadBERT``), local folder, or
            ``"minilm"``/``None`` for the bundled offline all-MiniLM-L6-v2
            (``t3d-models[minilm]``).
        max_length: truncation length in tokens; capped by the tokenizer's
            ``model_max_length``.
        freeze: freeze every text-encoder parameter.
        freeze_layers: freeze the embeddings and the lowest N transformer layers.
        pretrained: load the pretrained weights (``False`` builds the architecture with random
            weights; used by ``from_pretrained``, which restores weights from the checkpoint).
    """

    model_name_or_path: str | None = "minilm"
    max_length: int = Field(default=512, gt=0)
    freeze: bool = False
    freeze_layers: int = Field(default=0, ge=0)
    pretrained: bool = True


class InteractorConfig(_Strict):
    """Transformer-decoder interactor (visual tokens = queries, text tokens = keys/values).

    Attributes:
        width: model width ``d_model``; visual and text tokens are projected to it when needed.
        depth: number of ``nn.TransformerDecoderLayer`` layers.
        heads: attention heads; must divide ``width``.
        mlp_ratio: feed-forward width / ``width``.
        dropout: dropout inside the decoder layers.
    """

    width: int = Field(default=768, gt=0)
    depth: int = Field(default=1, ge=1)
    heads: int = Field(default=12, ge=1)
    mlp_ratio: float = Field(default=4.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> InteractorConfig:
        if self.width % self.heads:
            raise ValueError(
                f"interactor width {self.width} must be divisible by heads {self.heads}"
            )
        return self


class PreprocessingConfig(_Strict):
    """How a stored volume becomes this model's input: the record that travels with the weights.

    Pre-training fills it from the data config (``data.crop``) and refuses a data config that
    disagrees; ``save_pretrained`` writes it into ``config.json`` (and so into every checkpoint);
    evaluation and fine-tuning read it from the checkpoint instead of assuming defaults. The crop
    size is part of the record too, as :attr:`VisionConfig.crop_size` (see
    :meth:`T3DModelConfig.preprocessing_record`).

    Attributes:
        hu_window: HU range clipped and mapped linearly to [0, 1].
        pad_value: HU written where a crop extends beyond the volume (air).
        orientation: voxel axes of the stored arrays (``t3d-data prepare`` stores RAS).
        spacing: ``"native"``: volumes are used at their own voxel spacing, never resampled.
        intensity: the intensity policy. ``"hu_window_linear"`` (CT) =
            ``clip((HU - lo) / (hi - lo), 0, 1)``. ``"zscore_foreground"`` (MRI) = per channel,
            ``(x - mean) / std`` over the foreground voxels (``x != 0``, the rule of MONAI
            ``NormalizeIntensity(nonzero=True, channel_wise=True)``), background left at 0;
            ``hu_window`` and ``pad_value`` do not apply to it (crops and windows are padded
            with 0, the background, after normalisation).
    """

    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    pad_value: int = -1024
    orientation: Literal["RAS"] = "RAS"
    spacing: Literal["native"] = "native"
    intensity: Literal["hu_window_linear", "zscore_foreground"] = "hu_window_linear"

    @model_validator(mode="after")
    def _window_order(self) -> PreprocessingConfig:
        lo, hi = self.hu_window
        if not lo < hi:
            raise ValueError(f"preprocessing.hu_window must be (low, high) with low < high; got {self.hu_window}")
        return self


class T3DModelConfig(_Strict):
    """Full T3D model configuration (saved as ``config.json`` inside every checkpoint).

    Attributes:
        name: preset or run name (informational).
        vision: SwinUNETR tower.
        text: Hugging Face text tower.
        interactor: cross-modal interactor.
        embed_dim: shared embedding dimension E of ``proj_v``, ``proj_x``, ``proj_t``.
        head: crop heads ``proj_v`` and ``proj_x``: ``"bn_mlp"`` (Linear-BN-ReLU-Linear-BN,
            the default: plain heads let the crop embedding collapse to a constant, see
            docs/pretraining.md), ``"mlp"`` (Linear-GELU-Linear) or ``"linear"``.
        text_head: report head ``proj_t`` (same choices; default ``"mlp"``: it sees only B
            reports per process, too few for batch statistics).
        head_bn_momentum: running-statistics momentum of the BatchNorm heads (0.5: with
            torch's 0.1 the eval-mode statistics lagged behind fast-moving weights).
        contrastive_input: which crops the TCL/alignment embeddings are computed from when
            corrupted crops are given: ``"clean"`` (default; evaluation embeds clean crops, so
            training does too, at one extra encoder pass) or ``"corrupted"`` (one encoder pass
            shared with restoration).
        restoration: build the TIR restoration decoder (``False`` for ablations).
        preprocessing: how volumes are turned into input (:class:`PreprocessingConfig`); configs
            written before this field existed load with its defaults (the old fixed window).
    """

    name: str = "custom"
    vision: VisionConfig = Field(default_factory=VisionConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    interactor: InteractorConfig = Field(default_factory=InteractorConfig)
    embed_dim: int = Field(default=256, gt=0)
    head: Literal["bn_mlp", "bn_hidden_mlp", "mlp", "linear"] = "bn_mlp"
    text_head: Literal["bn_mlp", "bn_hidden_mlp", "mlp", "linear"] = "mlp"
    head_bn_momentum: float = Field(default=0.5, gt=0, le=1)
    contrastive_input: Literal["clean", "corrupted"] = "clean"
    restoration: bool = True
    preprocessing: PreprocessingConfig = Field(default_factory=PreprocessingConfig)

    def preprocessing_record(self) -> dict:
        """The full preprocessing record: :attr:`preprocessing` plus the crop size."""
        return {"crop_size": list(self.vision.crop_size), **self.preprocessing.model_dump(mode="json")}

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> T3DModelConfig:
        """Load a preset by name, optionally overriding top-level fields.

        Args:
            name: one of :func:`list_presets`.
            **overrides: top-level fields replacing the preset's (e.g. ``restoration=False``).

        Raises:
            ValueError: unknown name (the message lists valid names and the closest match).
        """
        data = load_preset(name)
        data.update(overrides)
        return cls.model_validate(data)

    @classmethod
    def from_json(cls, path: str) -> T3DModelConfig:
        """Read a config written by :meth:`to_json` / ``save_pretrained``."""
        with open(path, encoding="utf-8") as fh:
            return cls.model_validate_json(fh.read())

    def to_json(self) -> str:
        """Serialise to indented JSON."""
        return self.model_dump_json(indent=2)


def list_presets() -> list[str]:
    """Names of the bundled presets (``t3d_models/presets/*.json``), sorted."""
    root = resources.files(_PRESET_PACKAGE)
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict:
    """Raw dict of a preset.

    Raises:
        ValueError: unknown preset, naming the valid ones and the closest match.
    """
    names = list_presets()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(names)}.{hint}")
    text = resources.files(_PRESET_PACKAGE).joinpath(f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)
