"""t3d_models: the T3D model (SwinUNETR + HF text encoder + interactor), presets, I/O, model cards,
the Hugging Face Hub, export.

Importing this package is cheap: MONAI and transformers load on first model construction.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .card import CardFacts, write_model_card  # noqa: E402
from .config import (  # noqa: E402
    InteractorConfig,
    PreprocessingConfig,
    T3DModelConfig,
    TextConfig,
    VisionConfig,
    list_presets,
    load_preset,
)
from .export import (  # noqa: E402
    CHANNEL_ADAPT,
    adapt_input_channels,
    build_monai_swinunetr,
    export_swinunetr,
    save_swinunetr,
    swinunetr_kwargs,
)
from .heads import HEAD_KINDS, GlobalBatchNorm1d, ProjectionHead  # noqa: E402
from .hub import push_to_hub  # noqa: E402
from .interactor import Interactor  # noqa: E402
from .io import load_pretrained, save_pretrained  # noqa: E402
from .model import T3DModel  # noqa: E402
from .text import MINILM, HFTextEncoder, masked_mean, resolve_text_model  # noqa: E402
from .vision import SwinUNETRBackbone, VisionFeatures, check_crop_size  # noqa: E402

__all__ = [
    "CHANNEL_ADAPT",
    "HEAD_KINDS",
    "MINILM",
    "CardFacts",
    "GlobalBatchNorm1d",
    "HFTextEncoder",
    "Interactor",
    "InteractorConfig",
    "PreprocessingConfig",
    "ProjectionHead",
    "SwinUNETRBackbone",
    "T3DModel",
    "T3DModelConfig",
    "TextConfig",
    "VisionConfig",
    "VisionFeatures",
    "__version__",
    "adapt_input_channels",
    "build_monai_swinunetr",
    "check_crop_size",
    "export_swinunetr",
    "list_presets",
    "load_pretrained",
    "load_preset",
    "masked_mean",
    "push_to_hub",
    "resolve_text_model",
    "save_pretrained",
    "save_swinunetr",
    "swinunetr_kwargs",
    "write_model_card",
]
