"""Rule-based finding labeller for free-text CT reports: mentions, negation, laterality, synonyms.

A report is normalised (lower case, hyphens to spaces, punctuation spaced, so a tokenizer's
round trip such as ``"normal - sized spleen ."`` reads like the original), split into sentences
and clauses (``but``, ``however``, ``;``), and each :class:`FindingRule` is matched per clause:

1. an *explicit negative* pattern (``"the pleural spaces are clear"``, ``"heart size is
   normal"``) states the finding is absent;
2. otherwise a *mention* pattern (the finding's synonyms, e.g. ``hydrothorax`` / ``pleural
   fluid`` / ``pleural effusion``) is negated by a cue before its end in the clause (``no``,
   ``without``, ``not``, ``negative for``, ``free of``, ``neither``/``nor``) or after it
   (``is absent``, ``is not seen``, ``were not observed``), NegEx-style; else it is positive.

A finding is positive when any clause states it positively, negative when it is only mentioned
negatively, and unmentioned (``None``) otherwise. For rules with ``side=True`` the laterality of
the first positive mention is read from its clause: ``bilateral`` (``bilateral``, ``both``,
``right and left``), ``right`` or ``left``.

Two vocabularies ship: :data:`PHANTOM_RULES`, exact for every sentence the phantom generator
writes (``t3d_data.phantom.reports``, training and reserved paraphrases), and
:data:`CT_RATE_RULES`, the 18 abnormalities of CT-RATE (Hamamci et al. 2024) with common
synonyms. Pure Python (``re``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "CT_RATE_FINDINGS",
    "CT_RATE_RULES",
    "PHANTOM_RULES",
    "FindingLabel",
    "FindingRule",
    "ReportLabeller",
    "normalise_report",
    "vocabulary",
]


@dataclass(frozen=True)
class FindingRule:
    """How one finding is recognised.

    Attributes:
        name: the finding's label name.
        mentions: regexes (on normalised text) of statements about the finding.
        negatives: regexes of statements that the finding is absent.
        side: read laterality (right / left / bilateral) from positive mentions.
    """

    name: str
    mentions: tuple[str, ...]
    negatives: tuple[str, ...] = ()
    side: bool = False
    _compiled: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)
    _negs: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tuple(re.compile(p) for p in self.mentions))
        object.__setattr__(self, "_negs", tuple(re.compile(p) for p in self.negatives))


@dataclass(frozen=True)
class FindingLabel:
    """A finding as a report states it: ``present`` True / False / None (not mentioned)."""

    present: bool | None
    side: str | None = None


_PRE_NEGATION = re.compile(r"\b(no|not|without|absent|negative for|free of|neither|nor|"
                           r"never|ruled out|rules out|exclude[sd]?)\b")
_POST_NEGATION = re.compile(r"\b((is|are|was|were) (absent|not (seen|identified|present|"
                            r"observed|detected|noted|evident|enlarged))|absent|ruled out|"
                            r"not (seen|identified|observed|detected))\b")
_CLAUSE_SPLIT = re.compile(r"\s(?:but|however|although|whereas)\s|;")
_SENTENCE_SPLIT = re.compile(r"\s\.\s|\n|\s\.$")


def normalise_report(text: str) -> str:
    """Lower case, hyphens and slashes to spaces, punctuation spaced, decimals rejoined."""
    t = text.lower().replace("\r", "\n")
    t = re.sub(r"[-\u2013\u2014/]", " ", t)
    t = re.sub(r"([.,;:()\[\]!?])", r" \1 ", t)
    t = re.sub(r"(\d)\s*\.\s*(\d)", r"\1.\2", t)  # 13 . 7 cm -> 13.7 cm
    t = re.sub(r"[ \t]+", " ", t)
    return "\n".join(line.strip() for line in t.split("\n")).strip() + " "


def _clauses(text: str) -> list[str]:
    out = []
    for sentence in _SENTENCE_SPLIT.split(normalise_report(text)):
        out += [c.strip() for c in _CLAUSE_SPLIT.split(sentence) if c.strip()]
    return out


def _side(clause: str) -> str | None:
    if re.search(r"\b(bilateral|bilaterally|both)\b", clause):
        return "bilateral"
    right, left = re.search(r"\bright\b", clause), re.search(r"\bleft\b", clause)
    if right and left:
        return "bilateral"
    return "right" if right else "left" if left else None


class ReportLabeller:
    """Label reports with a set of :class:`FindingRule` s.

    Args:
        rules: the vocabulary (:data:`PHANTOM_RULES`, :data:`CT_RATE_RULES` or your own).

    Example:
        >>> lab = ReportLabeller(PHANTOM_RULES)
        >>> lab.label("No pleural effusion. Small left pleural effusion is absent.")["pleural_effusion"]
        FindingLabel(present=False, side=None)
    """

    def __init__(self, rules: Sequence[FindingRule]) -> None:
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise ValueError(f"finding rules must have unique names; got {names}")
        self.rules = list(rules)
        self.names = names

    def label_clause(self, rule: FindingRule, clause: str) -> FindingLabel:
        """One clause's statement about ``rule``'s finding (``present=None``: not mentioned)."""
        if any(p.search(clause) for p in rule._negs):
            return FindingLabel(False)
        for pattern in rule._compiled:
            m = pattern.search(clause)
            if m is None:
                continue
            if _PRE_NEGATION.search(clause[: m.end()]) or _POST_NEGATION.search(clause[m.end():]):
                return FindingLabel(False)
            return FindingLabel(True, _side(clause) if rule.side else None)
        return FindingLabel(None)

    def label(self, report: str) -> dict[str, FindingLabel]:
        """``{finding: FindingLabel}`` of one report, in rule order."""
        clauses = _clauses(report)
        out = {}
        for rule in self.rules:
            present: bool | None = None
            side = None
            for clause in clauses:
                lab = self.label_clause(rule, clause)
                if lab.present:
                    if present is not True or (side is None and lab.side is not None):
                        side = side or lab.side
                    present = True
                elif lab.present is False and present is None:
                    present = False
            out[rule.name] = FindingLabel(present, side if present else None)
        return out

    def positives(self, reports: Iterable[str]) -> list[list[bool]]:
        """Rows of ``present is True`` per finding (``names`` order), one row per report."""
        return [[lab.present is True for lab in self.label(r).values()] for r in reports]


_NUM = r"(?:\d+(?:\.\d+)?)"

#: Exact for the phantom generator's sentences (t3d_data.phantom.reports), both template pools.
PHANTOM_RULES: tuple[FindingRule, ...] = (
    FindingRule("lung_nodule", mentions=(r"\bnodul\w*",), side=True),
    FindingRule(
        "pleural_effusion",
        mentions=(r"\bpleural effusions?\b", r"\bhydrothorax\b", r"\bpleural fluid\b",
                  r"\bfluid\b.*\bpleural spaces?\b"),
        negatives=(r"\bpleural spaces? (are|is) clear\b",),
        side=True),
    FindingRule(
        "liver_lesion",
        mentions=(r"\b(liver|hepatic)\b.*\b(lesions?|cysts?|mass(es)?|abnormality)\b",
                  r"\b(lesions?|cysts?|mass(es)?)\b.*\b(liver|hepatic)\b"),
        side=True),
    FindingRule(
        "kidney_cyst",
        mentions=(r"\b(kidneys?|renal)\b.*\b(cysts?|cystic|lesions?|mass(es)?)\b",
                  r"\b(cysts?|lesions?|mass(es)?)\b.*\b(kidneys?|renal)\b"),
        negatives=(r"\bkidneys (are|appear) (unremarkable|normal)\b",
                   r"\bboth kidneys are normal\b"),
        side=True),
    FindingRule(
        "cardiomegaly",
        mentions=(r"\bcardiomegaly\b", r"\bheart (is|appears) enlarged\b",
                  r"\benlarged (heart|cardiac)\b", r"\bcardiac enlargement\b",
                  r"\bcardiac size is increased\b", r"\bincreased cardiac size\b"),
        negatives=(r"\bheart size is (normal|within normal limits)\b",
                   r"\bheart is normal in size\b", r"\bnormal heart size\b",
                   r"\bcardiac (dimensions|size) (are|is) within normal limits\b",
                   r"\bcardiac silhouette is not enlarged\b")),
    FindingRule(
        "splenomegaly",
        mentions=(r"\bsplenomegaly\b", r"\bspleen is enlarged\b", r"\benlarged spleen\b",
                  r"\bsplenic size is increased\b", r"\bspleen measures\b.*\benlarged\b"),
        negatives=(r"\bspleen is normal in size\b", r"\bnormal sized spleen\b",
                   r"\bsplenic (dimensions|size) (are|is) within normal limits\b",
                   r"\bspleen is not enlarged\b")),
    FindingRule(
        "fatty_liver",
        mentions=(r"\bsteatosis\b", r"\bfatty (liver|infiltration)\b", r"\bhypoattenuating\b",
                  r"\blow (liver|hepatic) attenuation\b", r"\bhepatic density is decreased\b",
                  r"\bliver appears darker\b"),
        negatives=(r"\bliver is normal in (size and )?attenuation\b",
                   r"\bnormal (hepatic|liver) (attenuation|density)\b",
                   r"\bliver has normal (density|attenuation)\b",
                   r"\bliver attenuation is within normal limits\b")),
)

#: The 18 abnormality labels of CT-RATE (order of its multi-abnormality label file).
CT_RATE_FINDINGS: tuple[str, ...] = (
    "medical_material", "arterial_wall_calcification", "cardiomegaly", "pericardial_effusion",
    "coronary_artery_wall_calcification", "hiatal_hernia", "lymphadenopathy", "emphysema",
    "atelectasis", "lung_nodule", "lung_opacity", "pulmonary_fibrotic_sequela",
    "pleural_effusion", "mosaic_attenuation_pattern", "peribronchial_thickening",
    "consolidation", "bronchiectasis", "interlobular_septal_thickening",
)

_CARDIO = next(r for r in PHANTOM_RULES if r.name == "cardiomegaly")

#: CT-RATE's 18 abnormalities with common synonyms (best effort; not validated on CT-RATE here).
CT_RATE_RULES: tuple[FindingRule, ...] = (
    FindingRule("medical_material",
                mentions=(r"\b(catheter|pacemaker|stent|prosthe\w*|port cath\w*|chest tube|"
                          r"drain(age)? (tube|catheter)|surgical clips?|sternotomy wires?|"
                          r"medical (material|device)|implant\w*|endotracheal tube|"
                          r"nasogastric tube)\b",)),
    FindingRule("arterial_wall_calcification",
                mentions=(r"\b(aort\w*|(?<!coronary )arter\w*|atherosclero\w*|vascular)\b.*"
                          r"\bcalcif\w*", r"\bcalcif\w*\b.*\b(aort\w*|(?<!coronary )arter\w*)\b",
                          r"\batherom\w*")),
    FindingRule("cardiomegaly", mentions=_CARDIO.mentions, negatives=_CARDIO.negatives),
    FindingRule("pericardial_effusion",
                mentions=(r"\bpericardial (effusion|fluid)\b",
                          r"\b(pleural|pleural and|pleural or) pericardial effusion",
                          r"\bfluid in the pericardi\w*")),
    FindingRule("coronary_artery_wall_calcification",
                mentions=(r"\bcoronar\w*\b.*\bcalcif\w*", r"\bcalcif\w*\b.*\bcoronar\w*")),
    FindingRule("hiatal_hernia", mentions=(r"\bhiat(al|us) hernia\b",)),
    FindingRule("lymphadenopathy",
                mentions=(r"\b(lymph)?adenopath\w*", r"\b(enlarged|pathologic\w*|"
                          r"prominent) (mediastinal |hilar |axillary )?(lymph )?nodes?\b",
                          r"\blymph nodes?\b.*\b(enlarged|pathologic\w*)\b")),
    FindingRule("emphysema", mentions=(r"\bemphysem\w*",), side=True),
    FindingRule("atelectasis", mentions=(r"\batelecta\w*",), side=True),
    FindingRule("lung_nodule", mentions=(r"\bnodul\w*",), side=True),
    FindingRule("lung_opacity",
                mentions=(r"\bopacit\w*", r"\bground glass\b", r"\binfiltrat\w*"), side=True),
    FindingRule("pulmonary_fibrotic_sequela",
                mentions=(r"\bfibro(sis|tic)\b", r"\bsequela\w*", r"\bparenchymal bands?\b",
                          r"\bscar(ring)?\b"), side=True),
    FindingRule("pleural_effusion",
                mentions=(r"\bpleural effusions?\b", r"\bhydrothorax\b", r"\bpleural fluid\b",
                          r"\bpleural (and|or) pericardial effusion"),
                negatives=(r"\bpleural spaces? (are|is) clear\b",), side=True),
    FindingRule("mosaic_attenuation_pattern", mentions=(r"\bmosaic\b",)),
    FindingRule("peribronchial_thickening",
                mentions=(r"\bperibronchial\b.*\bthicken\w*", r"\bbronchial wall thicken\w*")),
    FindingRule("consolidation", mentions=(r"\bconsolidat\w*",), side=True),
    FindingRule("bronchiectasis", mentions=(r"\bbronchiecta\w*",), side=True),
    FindingRule("interlobular_septal_thickening",
                mentions=(r"\b(interlobular )?septal thicken\w*",
                          r"\bthicken\w* (of the )?(interlobular )?sept\w*")),
)

_VOCABULARIES = {"phantom": PHANTOM_RULES, "ct-rate": CT_RATE_RULES}


def vocabulary(name: str) -> tuple[FindingRule, ...]:
    """The rules named ``phantom`` or ``ct-rate``.

    Raises:
        ValueError: an unknown name (lists the known ones).
    """
    try:
        return _VOCABULARIES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown labeller vocabulary {name!r}; known: "
                         f"{', '.join(_VOCABULARIES)}") from None
