"""The T3D pre-training objective: weighted TCL + TIR + global alignment over the model's output
dict (T3D, arXiv 2312.01529; v3 adds the alignment term). Presets are data, as in open_clip.
The objective is generic over the term registry (:mod:`t3d_objectives.terms`).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .alignment import AlignmentLoss, SigmoidAlignmentLoss
from .contrastive import TextInformedContrastiveLoss
from .restoration import RestorationLoss
from .terms import TERMS, Chance, Term, enabled_terms

__all__ = ["ObjectiveConfig", "PRESETS", "T3DObjective", "chance_losses", "term_names"]

#: The model-output keys that :meth:`T3DObjective.forward` names (the model's contract).
_NAMED_INPUTS = ("visual_emb", "text_informed_emb", "crop_group", "volume_emb", "text_emb",
                 "group", "restored", "target", "corruption_mask")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Plain (torch-only) configuration of :class:`T3DObjective`; field = constructor argument.

    The training script may wrap it in a pydantic model; this package never imports pydantic.

    >>> ObjectiveConfig(w_align=0.0).w_tcl
    1.0
    """

    w_tcl: float = 1.0
    w_tir: float = 1.0
    w_align: float = 1.0
    temperature: float = 0.2
    learnable_temperature: bool = True
    gather_distributed: bool = False
    tcl_symmetric: bool = False
    align_kind: str = "infonce"
    align_temperature: float = 0.2
    sigmoid_scale: float = 10.0
    sigmoid_bias: float = -10.0
    restoration_kind: str = "l1"
    restore_only_corrupted: bool = False
    #: weights of registered terms without an own field (``{"toy": 0.5}``); absent = 0 (off)
    extra_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        extra = self.extra_weights
        if extra is None:
            extra = {}
        if not isinstance(extra, Mapping):
            raise ValueError(f"extra_weights must be a mapping term name -> weight, like "
                             f"{{'toy': 0.5}}; got {extra!r}")
        object.__setattr__(self, "extra_weights", dict(extra))  # a private copy

    def __hash__(self) -> int:  # hashable like before extra_weights (a dict) existed
        values = [getattr(self, f.name) for f in dataclasses.fields(self)]
        values[-1] = tuple(sorted(self.extra_weights.items()))
        return hash(tuple(values))

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


PRESETS: dict[str, ObjectiveConfig] = {
    "t3d": ObjectiveConfig(),
    "t3d-v1": ObjectiveConfig(w_align=0.0),
}


def _as_config(config: Any) -> ObjectiveConfig:
    """An :class:`ObjectiveConfig` from itself, a :class:`T3DObjective` or any object with
    (some of) its fields as attributes (e.g. the training script's pydantic model)."""
    if isinstance(config, ObjectiveConfig):
        return config
    if isinstance(config, T3DObjective):
        return config.config
    names = [f.name for f in dataclasses.fields(ObjectiveConfig)]
    values = {n: getattr(config, n) for n in names if getattr(config, n, None) is not None}
    return ObjectiveConfig(**values)


def term_names(config: Any) -> list[str]:
    """The logged keys of the enabled terms, in registry order (``["tcl_loss", "tir_loss",
    "align_loss"]`` for the ``t3d`` preset); ``config``: as :func:`chance_losses`.

    >>> term_names(PRESETS["t3d-v1"])
    ['tcl_loss', 'tir_loss']
    """
    return [term.key for term, _ in enabled_terms(_as_config(config))]


def chance_losses(config: Any, studies: int, crops_per_study: int,
                  processes: int = 1) -> dict[str, Chance]:
    """The loss of a constant embedding per enabled term that has one, as
    ``{"<name>_loss": (formula, value)}``: TCL ``log(N-1)`` over the N crops scored together,
    InfoNCE alignment ``log B`` over the B studies (no entry for TIR or sigmoid alignment).

    Args:
        config: an :class:`ObjectiveConfig`, a :class:`T3DObjective`, or any object with the
            config's fields as attributes.
        studies: studies per step and process (the data loader's batch size).
        crops_per_study: crops drawn per study.
        processes: number of processes; counted only with ``gather_distributed`` (negatives
            from every rank), else each process scores its own batch.

    >>> chance_losses(PRESETS["t3d"], studies=4, crops_per_study=2)
    {'tcl_loss': ('log(7)', 1.9459101490553132), 'align_loss': ('log(4)', 1.3862943611198906)}
    """
    for name, value in (("studies", studies), ("crops_per_study", crops_per_study),
                        ("processes", processes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "studies" else 1):
            raise ValueError(f"{name} must be an integer >= {0 if name == 'studies' else 1}; "
                             f"got {value!r}")
    cfg = _as_config(config)
    b = studies * (processes if cfg.gather_distributed else 1)
    out = {}
    for term, _ in enabled_terms(cfg):
        value = term.chance(cfg, b, b * crops_per_study) if term.chance is not None else None
        if value is not None:
            out[term.key] = (value[0], float(value[1]))
    return out


class T3DObjective(nn.Module):
    """``L = Σ_term w_term·L_term`` over ``T3DModel``'s output dict; by default
    ``w_tcl·L_TCL + w_tir·L_TIR + w_align·L_align``.

    The terms come from the registry :data:`t3d_objectives.TERMS` (built-ins ``tcl``, ``tir``,
    ``align``; more with :func:`t3d_objectives.register_term`, weighted through
    ``extra_weights``). A term whose weight is 0 is neither built nor computed, and its key is
    **absent** from the returned dict (so a disabled term owns no parameters: no
    unused-parameter errors under DDP, nothing to log); its attribute (``objective.align``) is
    ``None``. The learnable temperatures live in this module's parameters: optimise
    ``objective.parameters()`` together with the model's.

    Args:
        w_tcl, w_tir, w_align: term weights (≥ 0, finite).
        temperature: initial TCL temperature; ``align_temperature``: initial alignment one
            (both 0.2, MoCo v3's value for BatchNorm projection heads: with the 8-crop batches
            of the CPU presets, 0.07 made the losses noisy and slower to fall; see
            docs/pretraining.md. The loss classes alone keep CLIP's 0.07).
        learnable_temperature: learn both InfoNCE temperatures (and the sigmoid scale/bias).
        gather_distributed: draw negatives from every rank (TCL and alignment).
        tcl_symmetric: see :class:`TextInformedContrastiveLoss` ``symmetric``.
        align_kind: ``"infonce"`` (:class:`AlignmentLoss`) or ``"sigmoid"``
            (:class:`SigmoidAlignmentLoss`, with ``sigmoid_scale``/``sigmoid_bias``).
        restoration_kind, restore_only_corrupted: :class:`RestorationLoss` options.
        extra_weights: ``{name: weight}`` for registered terms without an own weight field.

    Returns (forward):
        dict with ``"<name>_loss"`` per enabled term (``"tcl_loss"``, ``"tir_loss"``,
        ``"align_loss"``; unweighted), in registry order, and ``"loss"`` (the weighted total).
        :attr:`term_names` lists the term keys.

    Raises:
        ValueError: negative/non-finite weights, all weights 0, unknown ``align_kind``, unknown
            term in ``extra_weights``; in forward, an enabled term's input missing (e.g. TIR
            enabled but ``restored``/``target`` not given) or an output no term reads.

    >>> import torch
    >>> objective = T3DObjective.from_preset("t3d")
    >>> out = objective(
    ...     visual_emb=torch.randn(8, 16), text_informed_emb=torch.randn(8, 16),
    ...     crop_group=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
    ...     volume_emb=torch.randn(4, 16), text_emb=torch.randn(4, 16), group=torch.arange(4),
    ...     restored=torch.rand(8, 1, 8, 8, 8), target=torch.rand(8, 1, 8, 8, 8))
    >>> sorted(out)
    ['align_loss', 'loss', 'tcl_loss', 'tir_loss']
    >>> objective.term_names
    ['tcl_loss', 'tir_loss', 'align_loss']
    """

    tcl: TextInformedContrastiveLoss | None
    tir: RestorationLoss | None
    align: AlignmentLoss | SigmoidAlignmentLoss | None

    def __init__(
        self,
        w_tcl: float = 1.0,
        w_tir: float = 1.0,
        w_align: float = 1.0,
        temperature: float = 0.2,
        learnable_temperature: bool = True,
        gather_distributed: bool = False,
        tcl_symmetric: bool = False,
        align_kind: str = "infonce",
        align_temperature: float = 0.2,
        sigmoid_scale: float = 10.0,
        sigmoid_bias: float = -10.0,
        restoration_kind: str = "l1",
        restore_only_corrupted: bool = False,
        extra_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.config = ObjectiveConfig(
            w_tcl=w_tcl, w_tir=w_tir, w_align=w_align, temperature=temperature,
            learnable_temperature=learnable_temperature, gather_distributed=gather_distributed,
            tcl_symmetric=tcl_symmetric, align_kind=align_kind,
            align_temperature=align_temperature, sigmoid_scale=sigmoid_scale,
            sigmoid_bias=sigmoid_bias, restoration_kind=restoration_kind,
            restore_only_corrupted=restore_only_corrupted, extra_weights=extra_weights,
        )
        enabled = enabled_terms(self.config)  # validates every weight and term option
        #: weight per registered term (0.0: disabled), e.g. ``{"tcl": 1.0, "tir": 1.0, ...}``
        self.weights: dict[str, float] = {t.name: 0.0 for t in TERMS.values()}
        self.weights.update({t.name: w for t, w in enabled})
        self._terms: tuple[Term, ...] = tuple(t for t, _ in enabled)
        self._accepted = frozenset(_NAMED_INPUTS).union(
            *(set(t.inputs) | set(t.optional_inputs) for t in TERMS.values()))
        for term in TERMS.values():
            if hasattr(type(self), term.name):
                raise ValueError(f"term name {term.name!r} clashes with a T3DObjective attribute; "
                                 "register it under another name")
            if term.weight_field is not None:
                setattr(self, term.weight_field, self.weights[term.name])  # self.w_tcl ...
            setattr(self, term.name, term.build(self.config) if self.weights[term.name] > 0 else None)

    @property
    def term_names(self) -> list[str]:
        """The logged keys of the enabled terms, in order: ``["tcl_loss", "tir_loss", ...]``."""
        return [t.key for t in self._terms]

    @classmethod
    def from_config(cls, config: Any) -> T3DObjective:
        """Build from an :class:`ObjectiveConfig` (or any object with the same attributes)."""
        if isinstance(config, ObjectiveConfig):
            return cls(**config.to_dict())
        fields = [f.name for f in dataclasses.fields(ObjectiveConfig)]
        return cls(**{name: getattr(config, name) for name in fields if hasattr(config, name)})

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> T3DObjective:
        """Build a preset (``"t3d"``: weights 1, 1, 1; ``"t3d-v1"``: ``w_align=0``), with
        keyword overrides of any :class:`ObjectiveConfig` field."""
        if name not in PRESETS:
            hint = difflib.get_close_matches(name, PRESETS, n=1)
            raise ValueError(
                f"unknown objective preset {name!r}; choose one of {sorted(PRESETS)}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        try:
            config = dataclasses.replace(PRESETS[name], **overrides)
        except TypeError as err:
            raise ValueError(f"bad override for preset {name!r}: {err}") from None
        return cls.from_config(config)

    def forward(
        self,
        visual_emb: torch.Tensor | None = None,
        text_informed_emb: torch.Tensor | None = None,
        crop_group: torch.Tensor | None = None,
        volume_emb: torch.Tensor | None = None,
        text_emb: torch.Tensor | None = None,
        group: torch.Tensor | None = None,
        restored: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        corruption_mask: torch.Tensor | None = None,
        **outputs: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The model's output dict in, ``{"<name>_loss": ..., "loss": total}`` out. Keys beyond
        the named ones are accepted when a registered term reads them."""
        unknown = sorted(set(outputs) - self._accepted)
        if unknown:
            raise ValueError(f"T3DObjective got model output {unknown[0]!r}, which no registered "
                             f"term reads; accepted keys: {sorted(self._accepted)}")
        values = {
            "visual_emb": visual_emb, "text_informed_emb": text_informed_emb,
            "crop_group": crop_group, "volume_emb": volume_emb, "text_emb": text_emb,
            "group": group, "restored": restored, "target": target,
            "corruption_mask": corruption_mask, **outputs,
        }
        out: dict[str, torch.Tensor] = {}
        total = None
        for term in self._terms:
            missing = [k for k in term.inputs if values.get(k) is None]
            if missing:
                weight = self.weights[term.name]
                label = term.weight_label()
                how = f"{term.missing_hint} or " if term.missing_hint else "pass them or "
                raise ValueError(
                    f"{label}={weight} but {'/'.join(missing)} "
                    f"{'was' if len(missing) == 1 else 'were'} not given; {how}set {label}=0"
                )
            args = [values[k] for k in term.inputs]
            kwargs = {k: values[k] for k in term.optional_inputs if values.get(k) is not None}
            out[term.key] = getattr(self, term.name)(*args, **kwargs)
            weighted = self.weights[term.name] * out[term.key]
            total = weighted if total is None else total + weighted
        out["loss"] = total
        return out

    def extra_repr(self) -> str:
        parts = [f"{t.weight_field}={self.weights[t.name]}" for t in TERMS.values()
                 if t.weight_field is not None and t.name in self.weights]
        extra = {t.name: self.weights[t.name] for t in self._terms if t.weight_field is None}
        return ", ".join(parts + ([f"extra_weights={extra}"] if extra else []))
