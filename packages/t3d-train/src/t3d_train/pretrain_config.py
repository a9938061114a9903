"""The pre-training config: one pydantic model composed of the packages' own configs.

``data`` is :class:`t3d_data.DataConfig`, ``model`` is :class:`t3d_models.T3DModelConfig`
(``model.preset: NAME`` loads a preset and the other keys override it), ``objective`` mirrors
:class:`t3d_objectives.ObjectiveConfig` (``objective.preset`` + overrides), plus optimisation
and run settings owned by ``tools/pretrain.py``.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from t3d_data import DataConfig
from t3d_models import PreprocessingConfig, T3DModelConfig, VisionConfig, load_preset
from t3d_objectives import PRESETS, ObjectiveConfig, term_names

_STRICT = ConfigDict(extra="forbid")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


_objective_hints = typing.get_type_hints(ObjectiveConfig)
ObjectiveSection = create_model(  # every ObjectiveConfig field, optional, plus the preset name
    "ObjectiveSection",
    __config__=_STRICT,
    preset=(Literal[tuple(PRESETS)], "t3d"),  # type: ignore[valid-type]
    **{f.name: (_objective_hints[f.name] | None, None) for f in dataclasses.fields(ObjectiveConfig)},
)


def resolve_objective(section: BaseModel) -> ObjectiveConfig:
    """The preset's :class:`ObjectiveConfig` with the section's explicit fields applied."""
    overrides = {k: v for k, v in section.model_dump(exclude={"preset"}).items() if v is not None}
    return dataclasses.replace(PRESETS[section.preset], **overrides)


_RECORD_FIELDS = ("hu_window", "pad_value")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(float(x) == float(y) for x, y in zip(a, b, strict=True))
    return a == b


def _reconcile_preprocessing(model: dict, data: dict | None) -> tuple[dict, list[int]]:
    """One preprocessing contract between ``data.crop`` and the model (raises on a mismatch).

    The model's crop size (``model.vision.crop_size``) is the crop size; ``data.crop.crop_size``
    may repeat it but not differ. The HU window and padding come from ``data.crop`` into
    ``model.preprocessing`` (saved with the weights); a ``model.preprocessing`` given explicitly
    must agree with ``data.crop``. Where neither sets a field, the record's default is used and
    ``data.crop`` takes it from the record (one source of the defaults).
    """
    crop = (data or {}).get("crop") or {}
    vision = model.get("vision") or {}
    model_crop = vision.get("crop_size", VisionConfig().crop_size)
    if "crop_size" in crop and not _same(crop["crop_size"], model_crop):
        raise ValueError(
            f"data.crop.crop_size {list(crop['crop_size'])} differs from the model's crop size "
            f"model.vision.crop_size {list(model_crop)}: the model is built for its crop size; "
            "set both to the same value, or drop data.crop.crop_size to use the model's")
    given = dict(model.get("preprocessing") or {})
    record = PreprocessingConfig(**given).model_dump(mode="json")
    for key in _RECORD_FIELDS:
        if key in crop:
            if key in given and not _same(given[key], crop[key]):
                raise ValueError(
                    f"data.crop.{key}={crop[key]} disagrees with model.preprocessing.{key}="
                    f"{given[key]}: the model must be trained on the preprocessing it records; "
                    f"set one of them, not both")
            record[key] = list(crop[key]) if isinstance(crop[key], (list, tuple)) else crop[key]
    if record["intensity"] != "hu_window_linear":
        raise ValueError(
            f"model.preprocessing.intensity={record['intensity']}: pre-training crops are "
            "HU-windowed CT (t3d_data.RandCropSampler, hu_window_linear), so the record must say "
            "so; zscore_foreground is the MRI policy of fine-tuning (tools/finetune_seg.py "
            "--dataset brats)")
    model["preprocessing"] = record
    return model, list(model_crop)


class OptimConfig(BaseModel):
    """AdamW with linear warmup then cosine decay (transformers' schedule).

    ``lr`` is the learning rate of the projection heads, the interactor, the restoration
    decoder and the temperatures; the SwinUNETR encoder learns at ``lr * vision_lr_mult`` and
    the text encoder at ``lr * text_lr_mult`` (:meth:`t3d_models.T3DModel.param_groups`).
    """

    model_config = _STRICT
    lr: float = Field(2e-4, gt=0)
    vision_lr_mult: float = Field(0.1, ge=0)
    text_lr_mult: float = Field(0.1, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(10, ge=0)
    max_steps: int = Field(100, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    #: ``torch.optim.AdamW(fused=...)``: ``True`` one fused kernel per parameter group (CPU and
    #: CUDA), ``False`` the ``foreach`` implementation, ``None`` torch's default; same update
    #: within float rounding (tested), docs/performance.md.
    fused: bool | None = None


class CorruptionConfig(BaseModel):
    """Options of :class:`t3d_objectives.CropCorruption` (TIR inputs)."""

    model_config = _STRICT
    mode: Literal["both", "dropout", "shuffle"] = "both"
    drop_fraction: tuple[float, float] = (0.1, 0.3)
    max_block_fraction: float = Field(0.25, gt=0, le=1)
    shuffle_block_size: int = Field(4, ge=2)
    noise_std: float = Field(0.1, ge=0)


class RunConfig(BaseModel):
    """Where the run goes, how often it checkpoints, and what it tolerates."""

    model_config = _STRICT
    output_dir: Path = Path("runs/pretrain")
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(50, ge=1)
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    max_consecutive_skips: int = Field(5, ge=1)
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    tensorboard: bool = True
    eval_split: str | None = "test"
    eval_crops: int = Field(4, ge=1)
    debug_nan_steps: list[int] = Field(default_factory=list)
    #: speed knobs (docs/performance.md); none changes the maths beyond float rounding.
    #: ``torch.compile`` the model in place (state-dict keys unchanged); pays on GPUs, not on
    #: a 2-core CPU (minutes of compilation for seconds per step).
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"
    #: intra-op / inter-op CPU threads (``torch.set_num_threads`` / ``set_num_interop_threads``);
    #: ``None`` keeps torch's choice.
    threads: int | None = Field(None, ge=1)
    interop_threads: int | None = Field(None, ge=1)


class PretrainConfig(BaseModel):
    """Everything a pre-training run needs; written into the run folder and every checkpoint."""

    model_config = _STRICT
    data: DataConfig
    model: T3DModelConfig = Field(default_factory=lambda: T3DModelConfig.from_preset("t3d-tiny-cpu"))
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)  # type: ignore[valid-type]
    corruption: CorruptionConfig = Field(default_factory=CorruptionConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="before")
    @classmethod
    def _expand_presets(cls, data: Any) -> Any:
        """``model.preset`` loads that preset; the crop size defaults to the model's."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        model = data.get("model")
        if isinstance(model, dict) and "preset" in model:
            model = dict(model)
            name = model.pop("preset")
            try:
                base = load_preset(name)
            except (KeyError, ValueError) as err:
                raise ValueError(str(err).strip("'\"")) from None
            data["model"] = _deep_merge(base, model)
        model = data.get("model")
        if isinstance(model, T3DModelConfig):
            model = json.loads(model.model_dump_json())
        if model is None:
            model = load_preset("t3d-tiny-cpu")
        if not isinstance(model, dict):
            return data  # pydantic reports the type error
        d = data.get("data") if isinstance(data.get("data"), dict) else None
        model, crop_size = _reconcile_preprocessing(dict(model), d)
        data["model"] = model
        if d is not None:
            d = dict(d)
            crop = dict(d.get("crop") or {})
            crop.setdefault("crop_size", list(crop_size))
            crop.setdefault("hu_window", list(model["preprocessing"]["hu_window"]))
            crop.setdefault("pad_value", model["preprocessing"]["pad_value"])
            d["crop"] = crop
            data["data"] = d
        return data

    @model_validator(mode="after")
    def _check_consistency(self) -> PretrainConfig:
        # the enabled terms, from the registry (validates the weights and term options)
        terms = term_names(resolve_objective(self.objective))
        if self.data.crop.num_crops < 2 and "tcl_loss" in terms:
            raise ValueError(
                f"data.crop.num_crops={self.data.crop.num_crops}: TCL needs K >= 2 crops per study "
                "(crops of one study are each other's positives); set data.crop.num_crops=2 or more"
            )
        if "tir_loss" in terms and not self.model.restoration:
            raise ValueError("objective.w_tir > 0 needs model.restoration=true (or set objective.w_tir=0)")
        return self
