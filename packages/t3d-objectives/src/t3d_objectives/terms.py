"""The registry of objective terms: name → weight, loss module, model-output inputs, chance value.

:class:`~t3d_objectives.T3DObjective` is generic over this registry: it builds one loss module
per registered term whose weight is > 0 and feeds it the model outputs named by the term. The
three built-in terms register themselves next to their loss classes (``tcl`` in
``contrastive.py``, ``tir`` in ``restoration.py``, ``align`` in ``alignment.py``); adding a
term means writing its loss and one :func:`register_term` call (see docs/objectives.md,
"Adding a term").

>>> [(t.name, t.weight_field, t.inputs) for t in TERMS.values()][:2]
[('tcl', 'w_tcl', ('text_informed_emb', 'visual_emb', 'crop_group')), ('tir', 'w_tir', ('restored', 'target'))]
"""

from __future__ import annotations

import difflib
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["TERMS", "Term", "register_term", "unregister_term"]

#: A term's chance value: ``(formula, value)``, e.g. ``("log(15)", 2.708...)``.
Chance = tuple[str, float]

_RESERVED = frozenset({"loss", "config", "weights", "term_names", "extra_weights"})


@dataclass(frozen=True)
class Term:
    """One term of the objective.

    Args:
        name: short identifier (``"tcl"``); the loss module is the objective's attribute of that
            name (so its state_dict keys are ``"<name>.…"``) and the logged key is
            ``"<name>_loss"``.
        build: ``build(config) -> nn.Module``, the loss module from the full
            :class:`~t3d_objectives.ObjectiveConfig` (called only when the weight is > 0).
        inputs: model-output keys passed to the loss module positionally, in this order; all
            are required when the term is enabled.
        optional_inputs: model-output keys passed as keywords (by the same name) only when
            present and not None.
        weight_field: the :class:`~t3d_objectives.ObjectiveConfig` field holding the weight
            (``"w_tcl"``); ``None`` (every term added outside this package): the weight is
            ``config.extra_weights[name]``, 0 (off) when absent.
        chance: ``chance(config, studies, crops) -> (formula, value) | None``, the loss of a
            constant embedding for ``studies`` studies and ``crops`` crops scored together
            (``None``: no chance line, e.g. a regression loss).
        check: ``check(config)``, validates the term's options on every build (even with weight
            0) and raises ``ValueError`` with a one-line fix.
        missing_hint: how to supply missing inputs, used in the error raised by forward
            (``"pass corrupted= to the model (so it restores)"``).
        order: sort key of the registry (built-ins 10, 20, 30; default 100), which fixes the
            order of the logged keys and of the weighted sum.
    """

    name: str
    build: Callable[[Any], nn.Module]
    inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...] = ()
    weight_field: str | None = None
    chance: Callable[[Any, int, int], Chance | None] | None = None
    check: Callable[[Any], None] | None = None
    missing_hint: str = ""
    order: int = 100

    @property
    def key(self) -> str:
        """The logged key, ``"<name>_loss"``."""
        return f"{self.name}_loss"

    def weight_label(self) -> str:
        """How the weight is set: ``"w_tcl"`` or ``"extra_weights['toy']"``."""
        return self.weight_field or f"extra_weights[{self.name!r}]"


_REGISTRY: dict[str, Term] = {}
#: Read-only view of the registered terms, name → :class:`Term`, sorted by ``order``.
TERMS: Mapping[str, Term] = types.MappingProxyType(_REGISTRY)
_SEQ: dict[str, int] = {}


def register_term(term: Term, *, replace: bool = False) -> Term:
    """Add ``term`` to :data:`TERMS` (``replace=True`` to overwrite a term of the same name).
    Returns the term, so it can be used at module level: ``TOY = register_term(Term(...))``.

    Raises:
        ValueError: not a :class:`Term`; a name that is not a lower-case identifier or clashes
            with ``loss``/an ``nn.Module`` attribute; empty ``inputs``; a name already
            registered (without ``replace``).
    """
    if not isinstance(term, Term):
        raise ValueError(f"register_term needs a t3d_objectives.Term; got {type(term).__name__}")
    name = term.name
    if not (isinstance(name, str) and name.isidentifier() and name == name.lower()
            and not name.startswith("_")):
        raise ValueError(f"term name must be a lower-case identifier like 'tcl'; got {name!r}")
    if name in _RESERVED or hasattr(nn.Module, name):
        raise ValueError(f"term name {name!r} is reserved (an objective/nn.Module attribute); "
                         "choose another name")
    if not term.inputs or not all(isinstance(k, str) and k for k in term.inputs):
        raise ValueError(f"term {name!r}: inputs must be a non-empty tuple of model-output keys; "
                         f"got {term.inputs!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"term {name!r} is already registered; pass replace=True to overwrite "
                         "it or choose another name")
    _SEQ.setdefault(name, len(_SEQ))
    items = {**_REGISTRY, name: term}
    _REGISTRY.clear()
    _REGISTRY.update(sorted(items.items(), key=lambda kv: (kv[1].order, _SEQ[kv[0]])))
    return term


def unregister_term(name: str) -> Term:
    """Remove a registered term (for tests and plugins); returns it."""
    if name not in _REGISTRY:
        raise ValueError(f"no term {name!r} is registered; registered: {list(_REGISTRY)}")
    _SEQ.pop(name, None)
    return _REGISTRY.pop(name)


def term_weight(config: Any, term: Term) -> float:
    """The term's weight in ``config`` (validated: a finite number >= 0)."""
    if term.weight_field is not None:
        if not hasattr(config, term.weight_field):
            raise ValueError(f"term {term.name!r} reads its weight from {term.weight_field}, "
                             f"which the config lacks; add the field or set weight_field=None")
        w = getattr(config, term.weight_field)
    else:
        w = (getattr(config, "extra_weights", None) or {}).get(term.name, 0.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ValueError(f"{term.weight_label()} must be a finite number >= 0; got {w!r} "
                         "(0 disables the term)")
    return float(w)


def check_extra_weights(extra_weights: Mapping[str, object] | None) -> None:
    """Every key of ``extra_weights`` names a registered term without a ``weight_field``."""
    for name in extra_weights or {}:
        term = _REGISTRY.get(name)
        if term is None:
            hint = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
            raise ValueError(
                f"extra_weights names unknown term {name!r}; registered terms: {list(_REGISTRY)}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + "; register it with t3d_objectives.register_term first"
            )
        if term.weight_field is not None:
            raise ValueError(f"extra_weights[{name!r}]: the weight of term {name!r} is the field "
                             f"{term.weight_field}; set {term.weight_field}= instead")


def enabled_terms(config: Any) -> list[tuple[Term, float]]:
    """``[(term, weight), ...]`` of the registered terms with weight > 0, in registry order;
    runs every term's ``check`` and validates the weights (at least one > 0)."""
    check_extra_weights(getattr(config, "extra_weights", None))
    out = []
    for term in _REGISTRY.values():
        if term.check is not None:
            term.check(config)
        w = term_weight(config, term)
        if w > 0:
            out.append((term, w))
    if not out:
        labels = [t.weight_label() for t in _REGISTRY.values()]
        joined = labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]
        raise ValueError(f"{joined} are all 0; enable at least one term")
    return out
