"""Configs of the evaluation scripts (tools/evaluate.py, finetune_cls.py, finetune_seg.py).

Pydantic models with ``extra="forbid"``, composed from YAML (tools/configs/eval/*.yaml) with
``--set a.b=value`` overrides by :func:`t3d_train.config.load_config`, like the pre-training config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from t3d_data.names import safe_filename

_STRICT = ConfigDict(extra="forbid")


def _plain_name(value: str) -> str:
    if safe_filename(value) != value:
        raise ValueError(f"{value!r} is not a plain file name (letters, digits, '.', '_', '-'; "
                         f"no '/', '..' or leading '.'; at most 100 characters); e.g. "
                         f"{safe_filename(value)!r}")
    return value


#: A results file stem (``OUT/NAME.json``): one safe path component, see t3d_data.names.
FileStem = Annotated[str, AfterValidator(_plain_name)]

class ModelSection(BaseModel):
    """Which encoder to evaluate.

    ``checkpoint``: a ``save_pretrained`` folder (``RUN/model``). ``null`` means *no
    pre-training*: the ``preset`` architecture with random vision weights (seeded by
    ``runtime.seed``) and the preset's off-the-shelf text encoder.

    Volumes are windowed with the checkpoint's recorded preprocessing (``config.json`` →
    ``preprocessing``). ``hu_window`` may repeat it; a different window is an error unless
    ``force_preprocessing`` is true (see t3d_train/preprocessing.py). ``intensity`` likewise
    repeats the recorded policy (``hu_window_linear`` or ``zscore_foreground``); fine-tuning
    (finetune_seg) may set another one, e.g. ``zscore_foreground`` for MRI from a CT
    checkpoint, and then records it in its results.
    """

    model_config = _STRICT
    checkpoint: Path | None = None
    preset: str = "t3d-tiny-cpu"
    hu_window: tuple[float, float] | None = None
    intensity: Literal["hu_window_linear", "zscore_foreground"] | None = None
    force_preprocessing: bool = False


class EmbeddingSection(BaseModel):
    """How a whole volume becomes one embedding: mean over a sliding window or random crops."""

    model_config = _STRICT
    mode: Literal["sliding", "random"] = "sliding"
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    num_crops: int = Field(4, ge=1)
    crop_size: tuple[int, int, int] | None = None  # default: the model's vision.crop_size
    batch_size: int = Field(4, ge=1)


class RuntimeSection(BaseModel):
    """Threads and seed; ``threads`` caps torch's intra-op pool (null: torch's default)."""

    model_config = _STRICT
    threads: int | None = Field(2, ge=1)
    seed: int = 0


class EvaluateConfig(BaseModel):
    """tools/evaluate.py: retrieval, twin accuracy and zero-shot AUC on one split."""

    model_config = _STRICT
    model: ModelSection = Field(default_factory=ModelSection)
    store: Path
    split: str | None = "test"
    max_studies: int | None = Field(None, ge=1)
    out: Path = Path("runs/eval")
    name: FileStem = "eval"
    embedding: EmbeddingSection = Field(default_factory=EmbeddingSection)
    #: The store's dataset tasks (``t3d_data.tasks``): zero-shot prompts and report twins.
    #: ``null``: detected from the store (the phantom: its findings sidecar is found), and
    #: without a provider both are skipped with a note; a name (e.g. ``phantom``) picks one.
    tasks: str | None = None
    #: The phantom findings sidecar of the report twins (implies ``tasks: phantom``); default:
    #: found next to the store or the manifest it was prepared from.
    findings: Path | None = None
    twins_per_study: int = Field(4, ge=0)
    zero_shot_temperature: float = Field(0.07, gt=0)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)


class ProbeSection(BaseModel):
    """Logistic-regression linear probe on frozen volume features."""

    model_config = _STRICT
    C: float = Field(1.0, gt=0)
    max_iter: int = Field(2000, ge=1)


class FullFinetuneSection(BaseModel):
    """Full fine-tune (encoder + linear head) on random crops labelled with their study's findings."""

    model_config = _STRICT
    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-4, gt=0)
    head_lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(4, ge=1)
    crops_per_study: int = Field(2, ge=1)


class ClassifyConfig(BaseModel):
    """tools/finetune_cls.py: multi-label finding classification, macro AUC."""

    model_config = _STRICT
    model: ModelSection = Field(default_factory=ModelSection)
    store: Path
    train_split: str = "train"
    test_split: str = "test"
    max_train: int | None = Field(None, ge=1)
    max_test: int | None = Field(None, ge=1)
    out: Path = Path("runs/cls")
    name: FileStem = "cls"
    full: bool = False
    features: Literal["backbone", "embedding"] = "backbone"
    embedding: EmbeddingSection = Field(default_factory=EmbeddingSection)
    probe: ProbeSection = Field(default_factory=ProbeSection)
    finetune: FullFinetuneSection = Field(default_factory=FullFinetuneSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)


#: Dataset presets of ``finetune_seg --dataset NAME``: the fields a preset fills when they are
#: not given. BraTS: the three disjoint tumour labels NCR (1), ED (2, SNFH in 2023+) and ET (3
#: in BraTS 2023+, 4 in 2021; both are mapped), scored as classes (not the overlapping TC/WT/ET
#: regions); per-channel z-score of the four sequences; tested on the importer's ``val`` split
#: (the public BraTS test labels are not released).
SEG_DATASETS: dict[str, dict] = {
    "brats": {"classes": {"NCR": [1], "ED": [2], "ET": [3, 4]},
              "intensity": "zscore_foreground", "test_split": "val", "modality": "MR"},
}


class SegmentationConfig(BaseModel):
    """tools/finetune_seg.py: SwinUNETR from a T3D checkpoint (or scratch), Dice per class."""

    model_config = _STRICT
    model: ModelSection = Field(default_factory=ModelSection)
    scratch: bool = False
    #: A dataset preset (:data:`SEG_DATASETS`, e.g. ``brats``): fills ``classes``,
    #: ``model.intensity`` and ``test_split`` where they are not given, and checks that the
    #: store holds that modality.
    dataset: Literal["brats"] | None = None
    #: How a 1-channel checkpoint's input kernels meet a multi-channel store (the store's
    #: channel count decides ``in_channels``): ``repeat`` (W/C per channel: C copies of one
    #: image give the pre-trained features) or ``average``; see docs/models.md.
    channel_adapt: Literal["repeat", "average"] = "repeat"
    store: Path
    train_split: str = "train"
    test_split: str = "test"
    max_test: int | None = Field(None, ge=1)
    out: Path = Path("runs/seg")
    name: FileStem | None = None  # default: "seg-t3d" or "seg-scratch", so both arms can share OUT
    #: ``{class name: [label values]}`` merged into each scored class; ``null``: the classes of
    #: the store's dataset tasks (``t3d_data.tasks``; the phantom: lungs, heart, liver, spleen,
    #: kidneys), a one-line error for a store without them.
    classes: dict[str, list[int]] | None = None
    #: The dataset tasks provider of ``classes: null`` (default: detected from the store).
    tasks: str | None = None
    label_fraction: float = Field(0.1, gt=0.0, le=1.0)
    steps: int = Field(100, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(2, ge=1)
    samples_per_volume: int = Field(2, ge=1)
    roi_size: tuple[int, int, int] | None = None  # default: the model's vision.crop_size
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(2, ge=1)
    overlays: int = Field(2, ge=0)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)

    @field_validator("classes")
    @classmethod
    def _classes_disjoint(cls, v: dict[str, list[int]] | None) -> dict[str, list[int]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("classes is empty; map at least one class name to label values")
        seen: dict[int, str] = {}
        for name, values in v.items():
            if not values:
                raise ValueError(f"class {name!r} has no label values")
            for x in values:
                if x <= 0:
                    raise ValueError(f"class {name!r}: label value {x} must be > 0 (0 is background)")
                if x in seen:
                    raise ValueError(f"label value {x} is in both {seen[x]!r} and {name!r}")
                seen[x] = name
        return v

    @model_validator(mode="after")
    def _dataset_preset(self) -> SegmentationConfig:
        if self.dataset is None:
            return self
        preset = SEG_DATASETS[self.dataset]
        if self.classes is None:
            self.classes = {k: list(v) for k, v in preset["classes"].items()}
        if self.model.intensity is None:
            self.model.intensity = preset["intensity"]
        if "test_split" not in self.model_fields_set:
            self.test_split = preset["test_split"]
        return self

    @model_validator(mode="after")
    def _scratch_needs_architecture(self) -> SegmentationConfig:
        if not self.scratch and self.model.checkpoint is None:
            raise ValueError("model.checkpoint is null: pass a T3D checkpoint or set scratch=true "
                             "(from-scratch SwinUNETR of model.preset's architecture)")
        return self

    @property
    def init(self) -> str:
        """``"scratch"`` or ``"t3d"``: how the SwinUNETR is initialised."""
        return "scratch" if self.scratch else "t3d"

    @property
    def stem(self) -> str:
        """The results file stem: ``name``, or ``seg-t3d`` / ``seg-scratch``."""
        return self.name or f"seg-{self.init}"
