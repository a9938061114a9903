"""Model cards: the ``README.md`` (YAML front matter + Markdown) of every model folder.

``save_pretrained`` writes one from the config alone (architecture, preset, preprocessing
record, intended use and limits); callers that know more (steps, data, the command, measured
metrics) pass those facts as ``card={...}`` (:class:`CardFacts`), or rewrite the card of an
existing folder with :func:`write_model_card`. The front matter is built with
``huggingface_hub.ModelCardData``; the Hub reads it as the repo's metadata. Loading a model never
reads the card.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import __version__
from .config import T3DModelConfig

__all__ = ["CARD_NAME", "CardFacts", "model_card", "swinunetr_card", "write_model_card"]

CARD_NAME = "README.md"
PAPER = "https://arxiv.org/abs/2312.01529"
TAGS = ["medical-imaging", "ct", "3d", "vision-language", "self-supervised", "swin-unetr",
        "monai", "t3d"]
_MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

NOT_CLINICAL = (
    "**Not for clinical use.** This is not a medical device; its outputs must not inform "
    "diagnosis, treatment or triage of any patient. It has not been validated clinically."
)
INTENDED_USE = (
    "Research: pre-training and studying 3-D CT encoders with paired radiology reports "
    "(T3D, Liu et al., [arXiv 2312.01529]({paper})): initialising a MONAI SwinUNETR for "
    "segmentation or classification fine-tuning, and retrieval / zero-shot experiments with "
    "the text tower.\n\n" + NOT_CLINICAL
)
EXPORT_USE = (
    "Research: initialising segmentation (or, with the encoder alone, classification) "
    "fine-tuning on CT, and comparing against the same network trained from scratch "
    "(`SwinUNETR(**config['swinunetr'])` with MONAI's initialisation).\n\n" + NOT_CLINICAL
)

LIMITS = [
    "Inputs must be prepared exactly as the preprocessing record says (HU window, padding value, "
    "orientation, spacing policy, crop size); other inputs were never seen in training.",
    "Behaviour on scanners, protocols, populations and report styles outside the pre-training "
    "data is unknown; nothing here measures fairness across patient groups.",
    "Reports are read by the model's text encoder, in its language and vocabulary; "
    "findings it does not know are not understood.",
    "Crop sizes must be multiples of 32 in every dimension (SwinUNETR); the embeddings are not "
    "L2-normalised.",
    "Contrastive losses at or above chance (see the metrics) mean the encoder learned little "
    "from the reports; a card without metrics says nothing about quality.",
]


class CardFacts(BaseModel):
    """What a caller knows about how a model was trained and measured (all optional).

    Attributes:
        steps: optimizer steps of pre-training.
        data: the pre-training data (a store path, a dataset name, a short description).
        command: the command that trained the model (a string, or an argv list joined with
            ``shlex.join``).
        metrics: measured values by name (e.g. final losses, Recall@10, AUC).
        chance: chance level of some of the metrics, by the same names: a value or a
            ``(formula, value)`` pair such as ``("log(7)", 1.9459)``.
        metrics_command: the command that measured ``metrics`` (default: ``command``).
        notes: free text appended to the card.
        languages: language tags of the pre-training reports (BCP-47, e.g. ``["es"]``; the
            manifest's ``language`` field, kept in the store), shown under *Pre-training* and
            as the front matter's ``language``.
    """

    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(default=None, ge=0)
    data: str | None = None
    command: str | None = None
    metrics: dict[str, float | int | str] = Field(default_factory=dict)
    chance: dict[str, float | int | str | tuple[str, float]] = Field(default_factory=dict)
    metrics_command: str | None = None
    notes: str | None = None
    languages: list[str] | None = None

    @field_validator("command", "metrics_command", mode="before")
    @classmethod
    def _join_argv(cls, v: object) -> object:
        return shlex.join(str(a) for a in v) if isinstance(v, list | tuple) else v


def _facts(card: CardFacts | dict | None, where: str) -> CardFacts:
    if card is None:
        return CardFacts()
    if isinstance(card, CardFacts):
        return card
    try:
        return CardFacts.model_validate(card)
    except ValidationError as err:
        e = err.errors()[0]
        field = ".".join(str(p) for p in e["loc"]) or "card"
        raise ValueError(f"{where}: card field {field!r}: {e['msg']}; valid fields: "
                         f"{', '.join(CardFacts.model_fields)}") from None


def _front_matter(library_name: str, extra: dict[str, Any], base_model: str | None = None) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name=library_name, license="apache-2.0", tags=list(TAGS),
                         base_model=base_model, **extra)
    return f"---\n{data.to_yaml()}\n---\n"


def _preprocessing_section(record: dict[str, Any]) -> str:
    lo, hi = record["hu_window"]
    crop = "×".join(str(s) for s in record["crop_size"])
    if record["intensity"] == "zscore_foreground":
        intensity = [
            ("intensity", record["intensity"], "per channel `(x - mean) / std` over the "
             "foreground voxels (`x != 0`), background left at 0 (MONAI `NormalizeIntensity("
             "nonzero=True, channel_wise=True)`); no HU window, padding with 0"),
        ]
    else:
        intensity = [
            ("hu_window", f"[{lo:g}, {hi:g}]", "HU range clipped, then mapped linearly to [0, 1]"),
            ("intensity", record["intensity"],
             f"`clip((HU - ({lo:g})) / ({hi:g} - ({lo:g})), 0, 1)`"),
            ("pad_value", f"{record['pad_value']}",
             "HU written where a crop extends beyond the volume"),
        ]
    rows = [
        ("crop_size", crop, "input crops (voxels, D×H×W); multiples of 32"),
        *intensity,
        ("orientation", record["orientation"], "voxel axes of the arrays"),
        ("spacing", record["spacing"], "volumes used at their own voxel spacing, never resampled"),
    ]
    table = "\n".join(f"| `{k}` | {v} | {d} |" for k, v, d in rows)
    return ("## Preprocessing\n\nEvery input must be prepared this way (the record is also in "
            "`config.json` and in this card's front matter):\n\n| field | value | meaning |\n"
            f"|---|---|---|\n{table}\n\n```json\n{json.dumps(record)}\n```\n")


def _training_section(facts: CardFacts) -> str:
    out = ["## Pre-training\n"]
    if facts.steps is None and facts.data is None and facts.command is None:
        out.append("Not recorded: this card was written from the model's config alone (the "
                   "steps, data and command were not passed to `save_pretrained`). For a "
                   "`tools/pretrain.py` run, the run folder's `summary.json` and `log.jsonl` "
                   "hold them.\n")
        return "\n".join(out)
    out.append(f"- steps: {facts.steps if facts.steps is not None else 'not recorded'}")
    out.append(f"- data: {facts.data if facts.data is not None else 'not recorded'}")
    out.append("- report language(s): " + (", ".join(f"`{x}`" for x in facts.languages)
                                            if facts.languages else "not recorded"))
    if facts.command:
        out.append(f"- command:\n\n  ```bash\n  {facts.command}\n  ```")
    return "\n".join(out) + "\n"


def _fmt_value(v: float | int | str | tuple[str, float]) -> str:
    if isinstance(v, tuple):
        return f"{v[0]} = {_fmt_value(v[1])}"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _metrics_section(facts: CardFacts) -> str:
    if not facts.metrics:
        return ("## Metrics\n\nNone measured with this card. Measure with, e.g., "
                "`python tools/evaluate.py --checkpoint <this folder> --store STORE` "
                "(retrieval, report twins, zero-shot AUC, each next to its chance value).\n")
    lines = ["## Metrics\n", "| metric | value | chance |", "|---|---|---|"]
    for name, value in facts.metrics.items():
        chance = facts.chance.get(name)
        lines.append(f"| {name} | {_fmt_value(value)} | "
                     f"{_fmt_value(chance) if chance is not None else ''} |")
    command = facts.metrics_command or facts.command
    if command:
        lines.append(f"\nMeasured by:\n\n```bash\n{command}\n```")
    return "\n".join(lines) + "\n"


def _text_hub_id(config: T3DModelConfig) -> str | None:
    name = config.text.model_name_or_path
    if name is None or name.lower() in {"minilm", "all-minilm-l6-v2", _MINILM_HUB_ID.lower()}:
        return _MINILM_HUB_ID
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return None if Path(name).exists() else name


def model_card(config: T3DModelConfig, card: CardFacts | dict | None = None,
               parameters: dict[str, int] | None = None) -> str:
    """The ``README.md`` text of a T3D model folder.

    Args:
        config: the model's config (architecture, preset name, preprocessing record).
        card: training and measurement facts (:class:`CardFacts` or its dict).
        parameters: parameter counts by tower (``save_pretrained`` passes them).

    Raises:
        ValueError: an unknown or mistyped card field (named, with the valid fields).
    """
    facts = _facts(card, "model card")
    record = config.preprocessing_record()
    v, t, i = config.vision, config.text, config.interactor
    base = _text_hub_id(config)
    front = _front_matter("t3d-models", {
        "pipeline_tag": "feature-extraction",
        **({"language": list(facts.languages)} if facts.languages else {}),
        "t3d": {"preset": config.name, "t3d_models_version": __version__,
                "preprocessing": record, **({"steps": facts.steps} if facts.steps is not None else {})},
    }, base_model=base)
    arch = [
        ("preset / name", f"`{config.name}`"),
        ("vision", f"MONAI SwinUNETR{'-v2' if v.use_v2 else ''}, feature_size {v.feature_size}, "
                   f"window {v.window_size}, depths {list(v.depths)}, heads {list(v.num_heads)}, "
                   f"{v.in_channels} input channel(s), tokens from stage {v.token_stage}"),
        ("text", f"`{t.model_name_or_path}`"
                 + (f" ([{base}](https://huggingface.co/{base}))" if base else "")
                 + f", max_length {t.max_length}"),
        ("interactor", f"transformer decoder: width {i.width}, depth {i.depth}, {i.heads} heads, "
                       f"mlp {i.mlp_ratio:g}×, dropout {i.dropout:g}"),
        ("embeddings", f"E = {config.embed_dim}; crop heads `{config.head}`, report head "
                       f"`{config.text_head}`; contrastive input `{config.contrastive_input}`"),
        ("restoration (TIR)", "SwinUNETR decoder, 1 output channel" if config.restoration
         else "none (built without the decoder)"),
    ]
    if parameters:
        arch.append(("parameters", ", ".join(f"{k} {n / 1e6:.1f} M" for k, n in parameters.items())))
    arch_table = "\n".join(f"| {k} | {val} |" for k, val in arch)
    limits = "\n".join(f"- {x}" for x in LIMITS)
    body = f"""
# {config.name}

A T3D model ([Liu et al., arXiv 2312.01529]({PAPER})): a 3-D CT encoder (SwinUNETR), a report
encoder and an interactor, pre-trained with radiology reports by text-informed contrastive
learning and text-informed image restoration; how far this one was trained is under
*Pre-training*. Written by `t3d-models` {__version__}.

## Architecture

| part | value |
|---|---|
{arch_table}

{_preprocessing_section(record)}
{_training_section(facts)}
{_metrics_section(facts)}
## Intended use

{INTENDED_USE.format(paper=PAPER)}

## Limits

{limits}

## How to use

```python
from t3d_models import T3DModel, build_monai_swinunetr

model = T3DModel.from_pretrained("<this folder or its hub id>")   # the full T3D model
net = build_monai_swinunetr("<this folder or its hub id>", out_channels=14)  # plain MONAI SwinUNETR
```

Files: `config.json` (the full config, preprocessing record included), `model.safetensors`
(every tensor), `text_encoder/` (the text encoder's config and tokenizer, for offline loading).
"""
    if facts.notes:
        body += f"\n## Notes\n\n{facts.notes}\n"
    return front + body


def write_model_card(path: str | os.PathLike, card: CardFacts | dict | None = None,
                     config: T3DModelConfig | None = None,
                     parameters: dict[str, int] | None = None) -> Path:
    """(Re)write ``README.md`` of a model folder atomically; returns its path.

    Args:
        path: a folder written by ``save_pretrained``.
        card: training and measurement facts (see :class:`CardFacts`).
        config: the model's config (default: read from the folder's ``config.json``).
        parameters: parameter counts by tower.

    Raises:
        FileNotFoundError: no ``config.json`` in ``path`` and no ``config`` given.
        ValueError: an unknown or mistyped card field.
    """
    from .io import CONFIG_NAME, _atomic_write_text

    root = Path(path)
    if config is None:
        cfg_path = root / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {root}: write_model_card needs a folder "
                                    "written by save_pretrained (or pass config=)")
        config = T3DModelConfig.from_json(str(cfg_path))
    text = model_card(config, _facts(card, f"model card of {root}"), parameters)
    out = root / CARD_NAME
    _atomic_write_text(out, text)
    return out


def swinunetr_card(config: T3DModelConfig, monai_kwargs: dict[str, Any],
                   newly_initialised: list[str], source: str) -> str:
    """The ``README.md`` of a folder written by :func:`t3d_models.export.save_swinunetr`."""
    record = config.preprocessing_record()
    front = _front_matter("monai", {
        "pipeline_tag": "image-segmentation",
        "t3d": {"source": source, "preset": config.name, "t3d_models_version": __version__,
                "preprocessing": record},
    })
    new_modules = sorted({k.split(".", 1)[0] for k in newly_initialised})
    new = (f"Newly initialised (MONAI's default init, to be trained): modules "
           f"{', '.join(f'`{m}`' for m in new_modules)} ({len(newly_initialised)} tensor{'s' if len(newly_initialised) != 1 else ''})."
           if newly_initialised else "Every tensor comes from the T3D model.")
    limits = "\n".join(f"- {x}" for x in LIMITS)
    kwargs = json.dumps(monai_kwargs)
    body = f"""
# {config.name}: SwinUNETR exported from T3D

A plain `monai.networks.nets.SwinUNETR` whose weights (the encoder `swinViT`, `encoder1..4`,
`encoder10`, and the restoration decoder when exported) come from the T3D model `{config.name}`
([Liu et al., arXiv 2312.01529]({PAPER})), source `{source}`, except those named below. Written by `t3d-models`
{__version__}. {new}

## Architecture

`SwinUNETR(**{kwargs})`

{_preprocessing_section(record)}
## Intended use

{EXPORT_USE}

## Limits

{limits}

## How to use

```python
import json
from monai.networks.nets import SwinUNETR
from safetensors.torch import load_file

kwargs = json.load(open("config.json"))["swinunetr"]
net = SwinUNETR(**kwargs)
net.load_state_dict(load_file("model.safetensors"))   # strict: every key is in the file
```

Files: `config.json` (the `SwinUNETR` arguments under `swinunetr`, the preprocessing record,
the source and the newly initialised keys), `model.safetensors` (the full state dict).
"""
    return front + body
