"""Phantom reports: paraphrase templates, report rendering, twin reports and zero-shot prompts.

Every finding has >= 3 *train* paraphrases per polarity and 2 *reserved* ones used only for the
test split (a held-out-phrasing check). Template choices depend on ``(seed, finding, polarity)``
only, so two reports rendered with one seed differ exactly where their attributes differ, which
is what twin-report retrieval needs.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from t3d_data.phantom.findings import (
    EFFUSION_SIDES,
    FINDINGS,
    GRADES,
    SIZE_RANGES,
    ZONES,
    sample_attributes,
)

__all__ = [
    "IMPRESSIONS",
    "SHORT_NORMAL_REPORT",
    "TEMPLATES",
    "ZERO_SHOT_PROMPTS",
    "render_report",
    "twin_findings",
    "twin_report",
]

#: ``TEMPLATES[finding][polarity] = (train, reserved)``; polarity ``"pos"`` or ``"neg"``.
TEMPLATES: dict[str, dict[str, tuple[list[str], list[str]]]] = {
    "lung_nodule": {
        "pos": ([
            "There is a {size} mm solid nodule in the {side} {zone} lung zone.",
            "A {size} mm pulmonary nodule is present in the {zone} zone of the {side} lung.",
            "{Side} {zone} zone: solid pulmonary nodule measuring {size} mm.",
            "A solid nodule measuring {size} mm is noted in the {side} lung, {zone} zone.",
        ], [
            "The {side} lung harbors a {size_cm} cm rounded soft-tissue nodule in its {zone} third.",
            "Noted is a nodular opacity of {size} millimeters within the {zone} portion of the {side} lung.",
        ]),
        "neg": ([
            "No pulmonary nodules.",
            "The lungs are clear without focal nodule.",
            "No suspicious lung nodule is identified.",
        ], [
            "Lung parenchyma shows no nodular lesion.",
            "There is no evidence of a pulmonary mass or nodule.",
        ]),
    },
    "pleural_effusion": {
        "pos": ([
            "There {is_are} {a}{grade} {side} pleural effusion{s}.",
            "{Grade} {side} pleural effusion{s} {is_are} present.",
            "{A}{grade} {side} pleural effusion{s} layering dependently at the lung base{s}.",
            "Dependent fluid consistent with {a}{grade} {side} pleural effusion{s}.",
        ], [
            "Pleural fluid layers posteriorly on the {side_long}, {grade} in amount.",
            "{Grade} {side} hydrothorax is noted.",
        ]),
        "neg": ([
            "No pleural effusion.",
            "There is no pleural effusion.",
            "The pleural spaces are clear.",
        ], [
            "No fluid is seen in either pleural space.",
            "Pleural effusion is absent.",
        ]),
    },
    "cardiomegaly": {
        "pos": ([
            "The heart is enlarged.",
            "Cardiomegaly is present.",
            "There is cardiomegaly.",
            "Enlarged cardiac silhouette.",
        ], [
            "The cardiac size is increased.",
            "Cardiac enlargement is noted.",
        ]),
        "neg": ([
            "Heart size is normal.",
            "The heart is normal in size.",
            "No cardiomegaly.",
        ], [
            "Cardiac dimensions are within normal limits.",
            "The cardiac silhouette is not enlarged.",
        ]),
    },
    "fatty_liver": {
        "pos": ([
            "The liver is diffusely hypoattenuating relative to the spleen, consistent with hepatic steatosis.",
            "Diffuse fatty infiltration of the liver.",
            "Low liver attenuation compared with the spleen, in keeping with hepatic steatosis.",
        ], [
            "Hepatic density is decreased throughout, compatible with fatty liver.",
            "The liver appears darker than the spleen, suggesting steatosis.",
        ]),
        "neg": ([
            "The liver is normal in size and attenuation.",
            "Normal hepatic attenuation.",
            "The liver has normal density without steatosis.",
        ], [
            "Liver attenuation is within normal limits.",
            "No hepatic steatosis.",
        ]),
    },
    "liver_lesion": {
        "pos": ([
            "There is a {size} mm {kind_phrase} in the {lobe} hepatic lobe.",
            "A {kind_phrase} measuring {size} mm is seen in the {lobe} lobe of the liver.",
            "{Lobe} hepatic lobe: {size} mm {kind_phrase}.",
            "In the {lobe} lobe of the liver there is a {size} mm {kind_phrase}.",
        ], [
            "The {lobe} liver lobe contains a {size_cm} cm {kind_phrase}.",
            "Noted within the {lobe} lobe of the liver is a {kind_phrase}, {size} millimeters.",
        ]),
        "neg": ([
            "No focal liver lesion.",
            "The liver demonstrates no focal lesion.",
            "No focal hepatic abnormality is seen.",
        ], [
            "Hepatic parenchyma without focal mass or cyst.",
            "There are no focal lesions in the liver.",
        ]),
    },
    "splenomegaly": {
        "pos": ([
            "The spleen is enlarged, measuring {length} cm in craniocaudal length.",
            "Splenomegaly, with a craniocaudal span of {length} cm.",
            "Enlarged spleen measuring {length} cm.",
        ], [
            "Splenic size is increased ({length} cm craniocaudal).",
            "The spleen measures {length} cm, which is enlarged.",
        ]),
        "neg": ([
            "The spleen is normal in size.",
            "No splenomegaly.",
            "Normal-sized spleen.",
        ], [
            "Splenic dimensions are within normal limits.",
            "The spleen is not enlarged.",
        ]),
    },
    "kidney_cyst": {
        "pos": ([
            "There is a {size} mm simple cyst in the {side} kidney.",
            "A {size} mm hypodense cyst arises from the {side} kidney.",
            "{Side} renal cyst measuring {size} mm.",
            "The {side} kidney contains a {size} mm simple cyst.",
        ], [
            "A fluid-density lesion of {size_cm} cm is present in the {side} kidney, compatible with a cyst.",
            "Noted within the {side} kidney is a simple-appearing cyst, {size} millimeters.",
        ]),
        "neg": ([
            "The kidneys are unremarkable.",
            "No renal cysts or masses.",
            "Both kidneys are normal in appearance.",
        ], [
            "No focal renal lesion on either side.",
            "The kidneys show no cystic lesion.",
        ]),
    },
}

#: Impression phrases of present findings (any split).
IMPRESSIONS: dict[str, list[str]] = {
    "lung_nodule": ["{Side} {zone} zone pulmonary nodule, {size} mm.", "{size} mm {side} lung nodule.",
                    "Solitary {side} pulmonary nodule ({size} mm)."],
    "pleural_effusion": ["{Grade} {side} pleural effusion{s}.", "{Side_eff} pleural effusion{s}, {grade}.",
                         "{A}{grade} {side} pleural effusion{s}."],
    "cardiomegaly": ["Cardiomegaly.", "Enlarged heart.", "Cardiac enlargement."],
    "fatty_liver": ["Hepatic steatosis.", "Fatty liver.", "Diffuse hepatic steatosis."],
    "liver_lesion": ["{Lobe} hepatic lobe {kind_short} ({size} mm).", "{Kind_short} in the {lobe} liver lobe.",
                     "{size} mm {lobe} hepatic {kind_short}."],
    "splenomegaly": ["Splenomegaly ({length} cm).", "Enlarged spleen.", "Splenomegaly."],
    "kidney_cyst": ["{Side} renal cyst.", "Simple {side} kidney cyst ({size} mm).", "{Side} kidney cyst."],
}

_FILLERS = [
    ["The aorta is normal in caliber.", "No aortic aneurysm.", "Normal caliber aorta."],
    ["No acute osseous abnormality.", "The osseous structures are intact.", "No destructive bone lesion."],
]
_NORMAL_IMPRESSIONS = ["No acute abnormality.", "No acute cardiopulmonary or abdominal abnormality.",
                       "Normal CT of the chest and abdomen."]
#: The fixed all-normal report (identical text across studies: an identical-report group).
SHORT_NORMAL_REPORT = "FINDINGS:\nNo acute abnormality in the chest or abdomen.\n\nIMPRESSION:\nNo acute findings."
#: Sentence order of the FINDINGS section (``_filler<i>`` are organ-normal statements).
_ORDER = ["lung_nodule", "pleural_effusion", "cardiomegaly", "_filler0", "fatty_liver",
          "liver_lesion", "splenomegaly", "kidney_cyst", "_filler1"]

#: Zero-shot prompts per finding: several paraphrases per class, averaged by the evaluator.
ZERO_SHOT_PROMPTS: dict[str, dict[str, list[str]]] = {
    "lung_nodule": {
        "positive": ["There is a solid pulmonary nodule.", "A lung nodule is present.",
                     "Pulmonary nodule in the lung."],
        "negative": ["No pulmonary nodules.", "The lungs are clear without nodules.",
                     "No lung nodule is seen."],
    },
    "pleural_effusion": {
        "positive": ["There is a pleural effusion.", "Pleural effusion is present.",
                     "Fluid in the pleural space."],
        "negative": ["No pleural effusion.", "The pleural spaces are clear.",
                     "There is no pleural fluid."],
    },
    "liver_lesion": {
        "positive": ["There is a focal liver lesion.", "A lesion is seen in the liver.",
                     "Focal hepatic lesion."],
        "negative": ["No focal liver lesion.", "The liver has no focal lesion.",
                     "No hepatic mass or cyst."],
    },
    "kidney_cyst": {
        "positive": ["There is a renal cyst.", "A cyst in the kidney.", "Simple kidney cyst."],
        "negative": ["The kidneys are unremarkable.", "No renal cyst.", "No kidney lesion."],
    },
    "cardiomegaly": {
        "positive": ["The heart is enlarged.", "Cardiomegaly.", "Enlarged cardiac silhouette."],
        "negative": ["Heart size is normal.", "No cardiomegaly.", "The heart is normal in size."],
    },
    "splenomegaly": {
        "positive": ["The spleen is enlarged.", "Splenomegaly.", "Enlarged spleen."],
        "negative": ["The spleen is normal in size.", "No splenomegaly.", "Normal-sized spleen."],
    },
    "fatty_liver": {
        "positive": ["Hepatic steatosis.", "Fatty liver.", "The liver is hypoattenuating, consistent with steatosis."],
        "negative": ["The liver is normal in attenuation.", "No hepatic steatosis.",
                     "Normal liver density."],
    },
}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fields(attrs: dict[str, Any]) -> dict[str, str]:
    """Template fields of one finding's attributes (lower and ``Capitalised`` variants)."""
    f: dict[str, str] = {}
    if "side" in attrs:
        f["side"] = attrs["side"]
        bilateral = attrs["side"] == "bilateral"
        f["is_are"], f["a"], f["s"] = ("are", "", "s") if bilateral else ("is", "a ", "")
        f["side_long"] = "both sides" if bilateral else f"{attrs['side']} side"
        f["side_eff"] = "bilateral" if bilateral else f"{attrs['side']}-sided"
    for key in ("zone", "grade", "lobe"):
        if key in attrs:
            f[key] = attrs[key]
    if "size_mm" in attrs:
        f["size"] = str(int(attrs["size_mm"]))
        f["size_cm"] = f"{attrs['size_mm'] / 10:.1f}"
    if "kind" in attrs:
        cyst = attrs["kind"] == "cyst"
        f["kind_phrase"] = "hypodense cyst" if cyst else "hyperdense lesion"
        f["kind_short"] = "cyst" if cyst else "hyperdense lesion"
    if "length_cm" in attrs:
        f["length"] = f"{attrs['length_cm']:.1f}"
    f.update({_cap(k): _cap(v) for k, v in list(f.items())})
    return f


def _pick(options: list[str], seed: int, *key: int) -> str:
    return options[int(np.random.default_rng([seed, *key]).integers(len(options)))]


def render_report(findings: dict[str, dict[str, Any]], *, seed: int = 0, reserved: bool = False,
                  short_normal: bool = False) -> str:
    """Write the report of a study's findings.

    Args:
        findings: ``{finding: {"present": bool, ...}}`` (see :func:`sample_findings`).
        seed: template-choice seed; one seed gives one phrasing per (finding, polarity).
        reserved: use the reserved (test-only) paraphrases for every finding sentence.
        short_normal: when nothing is present, return :data:`SHORT_NORMAL_REPORT`.

    Returns:
        ``"FINDINGS:\\n...\\n\\nIMPRESSION:\\n..."``.

    Raises:
        ValueError: when a finding is missing.
    """
    missing = [f for f in FINDINGS if f not in findings]
    if missing:
        raise ValueError(f"findings lack {missing}; every one of {FINDINGS} needs 'present'")
    positives = [f for f in FINDINGS if findings[f]["present"]]
    if short_normal and not positives:
        return SHORT_NORMAL_REPORT
    sentences = []
    for item in _ORDER:
        if item.startswith("_filler"):
            j = int(item[-1])
            sentences.append(_pick(_FILLERS[j], seed, 100 + j))
            continue
        attrs = findings[item]
        pol = "pos" if attrs["present"] else "neg"
        train, held = TEMPLATES[item][pol]
        pool = held if reserved else train
        text = _pick(pool, seed, FINDINGS.index(item), int(attrs["present"])).format(**_fields(attrs))
        sentences.append(_cap(text))
    if positives:
        phrases = [_cap(_pick(IMPRESSIONS[f], seed, FINDINGS.index(f), 2).format(**_fields(findings[f])))
                   for f in positives]
        impression = phrases[0] if len(phrases) == 1 else "\n".join(
            f"{i}. {p}" for i, p in enumerate(phrases, 1))
    else:
        impression = _pick(_NORMAL_IMPRESSIONS, seed, 99)
    return "FINDINGS:\n" + " ".join(sentences) + "\n\nIMPRESSION:\n" + impression


def _other(options: tuple[str, ...] | list[str], current: str, rng: np.random.Generator) -> str:
    rest = [o for o in options if o != current]
    return rest[int(rng.integers(len(rest)))]


def twin_findings(findings: dict[str, dict[str, Any]], rng: np.random.Generator
                  ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Counterfactual findings that differ from ``findings`` in exactly one attribute.

    A finding is drawn uniformly, then one of its attributes: ``present`` (a flip; a newly
    present finding gets fresh attributes), or for a present finding ``side``, ``zone``,
    ``size_mm``, ``grade``, ``kind`` or ``lobe`` (a clearly different value).

    Args:
        findings: the true findings.
        rng: random generator.

    Returns:
        ``(twin, change)`` with ``change = {"finding", "attribute", "old", "new"}``.
    """
    twin = copy.deepcopy(findings)
    name = FINDINGS[int(rng.integers(len(FINDINGS)))]
    attrs = twin[name]
    keys = ["present"]
    if attrs["present"]:
        keys += [k for k in ("side", "zone", "size_mm", "grade", "kind", "lobe") if k in attrs]
    key = keys[int(rng.integers(len(keys)))]
    old = attrs.get(key)
    if key == "present":
        twin[name] = {"present": False} if old else sample_attributes(name, rng)
        new: Any = twin[name]["present"]
    elif key == "side":
        new = _other(EFFUSION_SIDES if name == "pleural_effusion" else ("right", "left"), old, rng)
    elif key == "zone":
        new = _other(ZONES, old, rng)
    elif key == "grade":
        new = _other(GRADES, old, rng)
    elif key == "kind":
        new = _other(("cyst", "hyperdense"), old, rng)
    elif key == "lobe":
        new = _other(("right", "left"), old, rng)
    else:  # size: about half or double, kept in the finding's range
        lo, hi = SIZE_RANGES[name]
        new = min(hi, max(old + 6, round(old * 1.8))) if old <= (lo + hi) / 2 else max(6, round(old * 0.5))
    if key != "present":
        attrs[key] = new
    return twin, {"finding": name, "attribute": key, "old": old, "new": new}


def twin_report(findings: dict[str, dict[str, Any]], rng: np.random.Generator, *, seed: int = 0,
                reserved: bool = False) -> str:
    """A report that differs from the study's in exactly one finding attribute.

    Rendered with the same template seed, it equals ``render_report(findings, seed=seed,
    reserved=reserved)`` except for the changed finding's sentence and impression line.

    Args:
        findings: the true findings.
        rng: random generator choosing the change.
        seed: the study's template seed.
        reserved: the study's template pool.

    Returns:
        The twin report text (always the full form, never :data:`SHORT_NORMAL_REPORT`).
    """
    twin, _ = twin_findings(findings, rng)
    return render_report(twin, seed=seed, reserved=reserved)
