"""The rule-based report labeller: hand-written sentences (negation, laterality, synonyms), every
phantom template (both pools, both polarities, every side), CT-RATE's 18 abnormalities."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from t3d_data.phantom import FINDINGS, render_report, sample_findings
from t3d_data.phantom.findings import EFFUSION_SIDES, GRADES, ZONES
from t3d_data.phantom.reports import IMPRESSIONS, TEMPLATES, _fields
from t3d_eval.report_labeller import (
    CT_RATE_FINDINGS,
    CT_RATE_RULES,
    PHANTOM_RULES,
    FindingLabel,
    ReportLabeller,
    normalise_report,
    vocabulary,
)

LAB = ReportLabeller(PHANTOM_RULES)


@pytest.mark.parametrize(("text", "finding", "present", "side"), [
    # negation before the mention, inside it, after it; scope ends at "but"
    ("No pleural effusion.", "pleural_effusion", False, None),
    ("There is no evidence of a pulmonary mass or nodule.", "lung_nodule", False, None),
    ("The kidneys show no cystic lesion.", "kidney_cyst", False, None),
    ("Pleural effusion is absent.", "pleural_effusion", False, None),
    ("Hepatic parenchyma without focal mass or cyst.", "liver_lesion", False, None),
    ("No pulmonary nodule on the right, but a 6 mm nodule in the left upper zone.",
     "lung_nodule", True, "left"),
    # explicit negative statements that carry no negation word
    ("The pleural spaces are clear.", "pleural_effusion", False, None),
    ("Heart size is normal.", "cardiomegaly", False, None),
    ("The kidneys are unremarkable.", "kidney_cyst", False, None),
    ("Normal-sized spleen.", "splenomegaly", False, None),
    # synonyms
    ("Small right hydrothorax is noted.", "pleural_effusion", True, "right"),
    ("Cardiac enlargement is noted.", "cardiomegaly", True, None),
    ("Diffuse fatty infiltration of the liver.", "fatty_liver", True, None),
    ("The liver appears darker than the spleen, suggesting steatosis.", "fatty_liver", True, None),
    ("Splenic size is increased (13.7 cm craniocaudal).", "splenomegaly", True, None),
    ("The spleen measures 13.7 cm, which is enlarged.", "splenomegaly", True, None),
    # laterality
    ("Pleural fluid layers posteriorly on the both sides, small in amount.", "pleural_effusion",
     True, "bilateral"),
    ("Right and left pleural effusions.", "pleural_effusion", True, "bilateral"),
    ("A 20 mm hypodense cyst arises from the left kidney.", "kidney_cyst", True, "left"),
    ("In the right lobe of the liver there is a 20 mm hyperdense lesion.", "liver_lesion", True,
     "right"),
    # unmentioned, and a sentence about another organ
    ("No acute abnormality in the chest or abdomen.", "cardiomegaly", None, None),
    ("A 20 mm simple cyst in the right kidney.", "liver_lesion", None, None),
])
def test_hand_written_sentences(text, finding, present, side):
    assert LAB.label(text)[finding] == FindingLabel(present, side)


def test_a_positive_clause_wins_over_a_negative_one_and_unmentioned_is_none():
    got = LAB.label("No pleural effusion. IMPRESSION: Small left pleural effusion.")
    assert got["pleural_effusion"] == FindingLabel(True, "left")
    assert got["cardiomegaly"].present is None
    assert LAB.positives(["The heart is enlarged.", "No cardiomegaly."])[0][FINDINGS.index(
        "cardiomegaly")] is True


def _attribute_options(finding):
    """Every attribute combination a template can show (sizes fixed)."""
    if finding == "lung_nodule":
        return [{"side": s, "zone": z, "size_mm": 12} for s in ("right", "left") for z in ZONES]
    if finding == "pleural_effusion":
        return [{"side": s, "grade": g} for s in EFFUSION_SIDES for g in GRADES]
    if finding == "liver_lesion":
        return [{"lobe": lo, "kind": k, "size_mm": 20} for lo in ("right", "left")
                for k in ("cyst", "hyperdense")]
    if finding == "kidney_cyst":
        return [{"side": s, "size_mm": 20} for s in ("right", "left")]
    if finding == "splenomegaly":
        return [{"length_cm": 13.7}]
    return [{}]


def _round_trip(text):
    """What a lower-casing WordPiece tokenizer gives back: lower case, spaced punctuation."""
    return " ".join(text.lower().replace(".", " . ").replace("-", " - ").replace(",", " ,").split())


@pytest.mark.parametrize("finding", FINDINGS)
def test_every_phantom_template_is_labelled_exactly(finding):
    """Each finding sentence and impression the generator can write, train and reserved pools,
    positive and negative, every side / lobe: the finding's label is exact and no other
    finding is said to be present."""
    train_pos, held_pos = TEMPLATES[finding]["pos"]
    train_neg, held_neg = TEMPLATES[finding]["neg"]
    cases = []
    for attrs in _attribute_options(finding):
        fields = _fields({"present": True, **attrs})
        side = attrs.get("side", attrs.get("lobe"))
        for template in (*train_pos, *held_pos, *IMPRESSIONS[finding]):
            cases.append((template.format(**fields), True, side))
    cases += [(t, False, None) for t in (*train_neg, *held_neg)]
    assert len(cases) >= 5
    for text, present, side in cases:
        for form in (text, _round_trip(text)):
            got = LAB.label(form)
            assert got[finding].present is present, form
            if present and finding != "splenomegaly" and side is not None:
                assert got[finding].side == side, form
            others = [n for n in FINDINGS if n != finding and got[n].present]
            assert not others, (form, others)


def test_whole_phantom_reports_match_their_findings():
    rng = np.random.default_rng(7)
    for i in range(40):
        findings = sample_findings(rng)
        for reserved, short in itertools.product((False, True), (False, True)):
            report = render_report(findings, seed=i, reserved=reserved, short_normal=short)
            got = LAB.label(report)
            assert [got[n].present is True for n in FINDINGS] == \
                [findings[n]["present"] for n in FINDINGS], report


@pytest.mark.parametrize(("text", "finding", "present"), [
    ("Bilateral pleural effusion and pericardial effusion are seen.", "pericardial_effusion", True),
    ("No pleural or pericardial effusion.", "pericardial_effusion", False),
    ("No pleural or pericardial effusion.", "pleural_effusion", False),
    ("Calcified atherosclerotic plaques in the aorta.", "arterial_wall_calcification", True),
    ("Coronary artery calcifications are present.", "coronary_artery_wall_calcification", True),
    ("Coronary artery calcifications are present.", "arterial_wall_calcification", False),
    ("A small sliding hiatal hernia.", "hiatal_hernia", True),
    ("No pathologically enlarged lymph nodes.", "lymphadenopathy", False),
    ("Mediastinal lymphadenopathy.", "lymphadenopathy", True),
    ("Centrilobular emphysema in both upper lobes.", "emphysema", True),
    ("Subsegmental atelectasis at the left base.", "atelectasis", True),
    ("Ground-glass opacities in the right lower lobe.", "lung_opacity", True),
    ("Fibrotic parenchymal bands.", "pulmonary_fibrotic_sequela", True),
    ("Mosaic attenuation pattern.", "mosaic_attenuation_pattern", True),
    ("Peribronchial wall thickening.", "peribronchial_thickening", True),
    ("No consolidation was observed.", "consolidation", False),
    ("Cylindrical bronchiectasis.", "bronchiectasis", True),
    ("Interlobular septal thickening.", "interlobular_septal_thickening", True),
    ("A pacemaker lead is in place.", "medical_material", True),
    ("Cardiomegaly.", "cardiomegaly", True),
    ("No lung nodule was detected.", "lung_nodule", False),
])
def test_ct_rate_vocabulary(text, finding, present):
    lab = ReportLabeller(CT_RATE_RULES)
    assert len(lab.names) == 18 and tuple(lab.names) == CT_RATE_FINDINGS
    got = lab.label(text)[finding].present
    assert (got is True) is present, (text, got)


def test_normalise_and_vocabulary_errors():
    assert normalise_report("Normal-sized spleen (13.7 cm).") == "normal sized spleen ( 13.7 cm ) . "
    assert normalise_report("13. 7 cm") == normalise_report("13.7 cm")
    assert vocabulary("CT-RATE") is CT_RATE_RULES
    with pytest.raises(ValueError, match="known: phantom, ct-rate"):
        vocabulary("mimic")
    with pytest.raises(ValueError, match="unique names"):
        ReportLabeller([PHANTOM_RULES[0], PHANTOM_RULES[0]])
