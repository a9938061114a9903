"""Tests of the phantom CT-report generator: determinism, manifest, honesty, templates, twins.

The honesty test re-derives every finding from the VOLUME's HU (organs located with the label
map, sides in world coordinates via the affine, RAS+: +x = patient's right) and checks it
against what the report states or negates.
"""

from __future__ import annotations

import dataclasses
import json
import re
from functools import cache

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from t3d_data.phantom import (
    FINDINGS,
    LESION_LABELS,
    ORGAN_LABELS,
    SHORT_NORMAL_REPORT,
    TEMPLATES,
    ZERO_SHOT_PROMPTS,
    PhantomStudy,
    generate_phantom_dataset,
    generate_study,
    render_report,
    sample_findings,
    twin_findings,
    twin_report,
)

HONESTY_SEEDS = range(16)
SMALL = (48, 48, 40)
NON_LUNG = [v for k, v in ORGAN_LABELS.items() if not k.startswith("lung")]


@cache
def _study(seed: int) -> PhantomStudy:
    return generate_study(seed)


# ---------------------------------------------------------------- measurements from the volume


Box = tuple[slice, slice, slice]


def _bbox(mask: np.ndarray, pad: int = 3) -> Box:
    idx = np.argwhere(mask)
    lo, hi = idx.min(0) - pad, idx.max(0) + pad + 1
    return tuple(slice(max(0, a), min(n, b)) for a, b, n in zip(lo, hi, mask.shape, strict=True))  # type: ignore[return-value]


def _world(study: PhantomStudy, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable world coordinates (mm, RAS+) of the voxels of a box, from the affine."""
    ijk = np.ogrid[box]
    a = study.affine
    return tuple(sum(a[r, c] * ijk[c] for c in range(3)) + a[r, 3] for r in range(3))  # type: ignore[return-value]


def _centroid_world(study: PhantomStudy, mask: np.ndarray, box: Box) -> np.ndarray:
    start = np.array([s.start for s in box])
    return (study.affine @ np.r_[np.argwhere(mask).mean(0) + start, 1.0])[:3]


def _side_of(study: PhantomStudy, mask: np.ndarray, box: Box) -> str:
    """Patient side of a region: RAS+ world x above the body midline is the patient's right."""
    return "right" if _centroid_world(study, mask, box)[0] > study.anatomy["midline_x"] else "left"


def _voxel_ml(study: PhantomStudy) -> float:
    return abs(np.linalg.det(study.affine[:3, :3])) / 1000.0


def _cavity(study: PhantomStudy, side: str) -> tuple[Box, np.ndarray]:
    """Hemithorax (lung + pleural space) from the stored geometry, minus other organs."""
    p = study.anatomy["lungs"][side]
    corners = np.array([[p["cx"] + sx * p["lx"], p["cy"] + sy * p["ly"], p["z0"] + sz * p["H"], 1.0]
                        for sx in (-1, 1) for sy in (-1, 1) for sz in (0, 1)])
    ijk = (np.linalg.inv(study.affine) @ corners.T)[:3]
    box = tuple(slice(max(0, int(np.floor(lo)) - 1), min(n, int(np.ceil(hi)) + 2))
                for lo, hi, n in zip(ijk.min(1), ijk.max(1), study.volume.shape, strict=True))
    x, y, z = _world(study, box)
    q = ((x - p["cx"]) / p["lx"]) ** 2 + ((y - p["cy"]) / p["ly"]) ** 2
    inside = (q + ((z - p["z0"]) / p["H"]) ** 2 <= 1) & (z >= p["z0"] + p["dome"] * (1 - q))
    # other organs, and their one-voxel partial-volume rim, are not hemithorax content
    other = ndimage.binary_dilation(np.isin(study.label_map[box], NON_LUNG))
    return box, inside & ~other


def _lung_findings(study: PhantomStudy) -> dict[str, dict]:
    """Non-aerated components per hemithorax: compact blobs (nodules) and layered fluid."""
    out = {}
    for side in ("right", "left"):
        box, cav = _cavity(study, side)
        vol = study.volume[box].astype(np.float32)
        comps, n = ndimage.label(cav & (vol > -300))
        nodules, fluid, blobs = [], np.zeros_like(cav), []
        for k, sl in enumerate(ndimage.find_objects(comps), 1):
            comp = comps == k
            ext = [(s.stop - s.start) * sp for s, sp in zip(sl, study.spacing, strict=True)]
            shell = ndimage.binary_dilation(comp, iterations=2) & ~comp
            aerated = np.mean(vol[shell] < -500)
            # a nodule: compact and surrounded by aerated lung; anything else is fluid
            if max(ext) <= 40.0 and aerated >= 0.8:
                blobs.append((k, sl))
            else:
                fluid |= comp
        for k, sl in blobs:
            comp = comps == k
            if comp.sum() < 3:
                continue
            near = tuple(slice(max(0, s.start - 3), s.stop + 3) for s in sl)
            region = cav[near] & ~fluid[near]
            hu = vol[near][region]
            base = np.median(hu[hu < -500])
            v_ml = ((hu - base) / (35.0 - base)).sum() * _voxel_ml(study)
            p = study.anatomy["lungs"][side]
            nodules.append({"side": _side_of(study, comp, box),
                            "z_frac": (_centroid_world(study, comp, box)[2] - p["z0"]) / p["H"],
                            "diameter": (6 * max(v_ml, 0) * 1000 / np.pi) ** (1 / 3)})
        fl = {"ml": fluid.sum() * _voxel_ml(study), "frac": fluid.sum() / max(cav.sum(), 1),
              "hu": float(np.median(vol[fluid])) if fluid.any() else None,
              "side": _side_of(study, fluid, box) if fluid.any() else None}
        out[side] = {"nodules": nodules, "fluid": fl}
    return out


def _focal_lesions(study: PhantomStudy, organ: str, threshold: float, nominal: dict[str, float]):
    """HU outliers inside an organ (organ extent = its label with holes filled)."""
    box = _bbox(study.label_map == ORGAN_LABELS[organ])
    vol = study.volume[box].astype(np.float32)
    lab = study.label_map[box]
    filled = ndimage.binary_fill_holes(lab == ORGAN_LABELS[organ])
    others = [v for k, v in ORGAN_LABELS.items() if k not in (organ, "body")]
    cube = np.ones((3, 3, 3), bool)
    core = ndimage.binary_erosion(filled, cube, iterations=2) & ~ndimage.binary_dilation(
        np.isin(lab, others), cube, iterations=2)
    med = float(np.median(vol[core & (lab == ORGAN_LABELS[organ])]))  # parenchyma reference
    smooth = ndimage.uniform_filter(vol, 3)
    comps, n = ndimage.label(core & (np.abs(smooth - med) > threshold), cube)
    x, _, _ = _world(study, box)
    x = np.broadcast_to(x, filled.shape)[filled]
    found = []
    for k in range(1, n + 1):
        comp = comps == k
        if comp.sum() < 3:
            continue
        mean = float(vol[comp].mean())
        kind = "hyperdense" if mean > med else "cyst"
        region = ndimage.binary_dilation(comp, iterations=3) & filled
        v_ml = ((vol[region] - med) / (nominal[kind] - med)).sum() * _voxel_ml(study)
        cx = _centroid_world(study, comp, box)[0]
        found.append({"kind": kind, "mean": mean, "organ_median": med,
                      "side": _side_of(study, comp, box),
                      "x_frac": (cx - x.min()) / np.ptp(x),
                      "diameter": (6 * max(v_ml, 0) * 1000 / np.pi) ** (1 / 3)})
    return found, med


def _width_mm(study: PhantomStudy, mask: np.ndarray) -> float:
    """Largest left-right extent over axial slices (mm)."""
    sx = np.linalg.norm(study.affine[:3, 0])
    widths = [np.ptp(np.flatnonzero(mask[:, :, k].any(1))) + 1 for k in range(mask.shape[2])
              if mask[:, :, k].any()]
    return max(widths) * sx


def _measure(study: PhantomStudy) -> dict:
    lab, vol = study.label_map, study.volume
    liver, liver_med = _focal_lesions(study, "liver", 30.0, {"cyst": 5.0, "hyperdense": 120.0})
    kidneys = {s: _focal_lesions(study, f"kidney_{s}", 18.0, {"cyst": 4.0, "hyperdense": 120.0})[0]
               for s in ("right", "left")}
    spleen = lab == ORGAN_LABELS["spleen"]
    spleen_core = ndimage.binary_erosion(spleen, iterations=2)
    lungs = np.isin(lab, [ORGAN_LABELS["lung_right"], ORGAN_LABELS["lung_left"]])
    ks = np.flatnonzero(spleen.any((0, 1)))
    return {
        "lungs": _lung_findings(study),
        "liver": liver,
        "kidneys": kidneys,
        "liver_minus_spleen": liver_med - float(np.median(vol[spleen_core])),
        "ctr": _width_mm(study, lab == ORGAN_LABELS["heart"]) / _width_mm(study, lungs),
        "spleen_cm": (ks[-1] - ks[0] + 1) * np.linalg.norm(study.affine[:3, 2]) / 10,
    }


# ------------------------------------------------------------------------------------- tests


def test_generate_study_basics():
    s = _study(0)
    assert s.volume.dtype == np.int16 and s.volume.ndim == 3
    assert s.label_map.shape == s.volume.shape
    assert 112 <= s.volume.shape[0] <= 144 and 96 <= s.volume.shape[2] <= 128
    assert all(2.0 <= v <= 3.2 for v in s.spacing[:2]) and 2.5 <= s.spacing[2] <= 4.0
    assert nib.aff2axcodes(s.affine) == ("R", "A", "S")
    assert s.volume.min() <= -950 and s.volume.max() >= 300  # air and bone
    assert list(s.labels) == FINDINGS
    assert s.report.startswith("FINDINGS:\n") and "\n\nIMPRESSION:\n" in s.report
    assert set(np.unique(s.label_map)) <= {0, *ORGAN_LABELS.values(), *LESION_LABELS.values()}
    small = generate_study(0, shape=SMALL)
    assert small.volume.shape == SMALL
    with pytest.raises(ValueError, match="shape"):
        generate_study(0, shape=(8, 8, 8))


def test_determinism_by_seed():
    a, b, c = generate_study(7, shape=SMALL), generate_study(7, shape=SMALL), generate_study(8, shape=SMALL)
    assert np.array_equal(a.volume, b.volume) and np.array_equal(a.label_map, b.label_map)
    assert a.report == b.report and a.findings == b.findings
    assert not np.array_equal(a.volume, c.volume)
    g = generate_study(np.random.default_rng(7), shape=SMALL)
    assert np.array_equal(g.volume, a.volume)


@pytest.mark.parametrize("seed", HONESTY_SEEDS)
def test_honesty_report_matches_volume(seed):
    s = _study(seed)
    f, m = s.findings, _measure(s)
    assert s.report == render_report(f, seed=s.report_seed, reserved=s.reserved,
                                     short_normal=s.short_normal)
    if s.short_normal:
        assert s.report == SHORT_NORMAL_REPORT and not any(s.labels.values())
    # lung nodule: a compact soft-tissue blob in the stated hemithorax, zone and size
    nodules = [n for side in ("right", "left") for n in m["lungs"][side]["nodules"]]
    if f["lung_nodule"]["present"]:
        a = f["lung_nodule"]
        assert len(nodules) == 1, nodules
        n = nodules[0]
        assert n["side"] == a["side"]
        assert ("lower", "middle", "upper")[min(2, int(n["z_frac"] * 3))] == a["zone"]
        assert abs(n["diameter"] - a["size_mm"]) <= 0.2 * a["size_mm"] + 2.0, (n, a)
        assert f"{a['side']}" in s.report.lower() and (
            f"{a['size_mm']} m" in s.report or f"{a['size_mm'] / 10:.1f} cm" in s.report)
    else:
        assert nodules == []
    # pleural effusion: water-density fluid layering in the stated hemithorax(es)
    fluid_sides = {side for side in ("right", "left") if m["lungs"][side]["fluid"]["ml"] > 0}
    if f["pleural_effusion"]["present"]:
        a = f["pleural_effusion"]
        want = {"right", "left"} if a["side"] == "bilateral" else {a["side"]}
        assert fluid_sides == want
        for side in want:
            fl = m["lungs"][side]["fluid"]
            assert fl["side"] == side and -15 <= fl["hu"] <= 35 and fl["ml"] > 10
            lo, hi = {"small": (0.0, 0.055), "moderate": (0.055, 0.17), "large": (0.17, 1.0)}[a["grade"]]
            assert lo <= fl["frac"] < hi, (a, fl)
    else:
        assert fluid_sides == set()
    # liver lesion: HU outlier inside the liver; kind from its HU, lobe from world x
    if f["liver_lesion"]["present"]:
        a = f["liver_lesion"]
        assert len(m["liver"]) == 1, m["liver"]
        les = m["liver"][0]
        assert les["kind"] == a["kind"]
        if a["kind"] == "cyst":
            assert les["mean"] < 25 and les["organ_median"] - les["mean"] > 30
        else:
            assert les["mean"] - les["organ_median"] > 35
        assert ("left" if les["x_frac"] < 0.35 else "right") == a["lobe"], les
        assert abs(les["diameter"] - a["size_mm"]) <= 0.25 * a["size_mm"] + 3.0, (les, a)
    else:
        assert m["liver"] == []
    # kidney cyst: water-density focus in the stated kidney only
    cysts = {side: c for side, c in m["kidneys"].items() if c}
    if f["kidney_cyst"]["present"]:
        a = f["kidney_cyst"]
        assert list(cysts) == [a["side"]]
        c = cysts[a["side"]][0]
        assert c["kind"] == "cyst" and c["side"] == a["side"] and c["mean"] < 20
        assert abs(c["diameter"] - a["size_mm"]) <= 0.25 * a["size_mm"] + 3.0, (c, a)
    else:
        assert cysts == {}
    # fatty liver: liver at least 10 HU below the spleen; otherwise above it
    assert (m["liver_minus_spleen"] < -10) == f["fatty_liver"]["present"], m["liver_minus_spleen"]
    # cardiomegaly: cardiothoracic width ratio (mm) above 0.5
    assert (m["ctr"] > 0.5) == f["cardiomegaly"]["present"], m["ctr"]
    assert abs(m["ctr"] - 0.5) > 0.03
    # splenomegaly: craniocaudal length > 12 cm, stated length = measured length
    assert (m["spleen_cm"] > 12.0) == f["splenomegaly"]["present"], m["spleen_cm"]
    if f["splenomegaly"]["present"]:
        assert f"{m['spleen_cm']:.1f} cm" in s.report or "spleen." in s.report.lower()


def test_sides_come_from_the_affine_not_the_array_order():
    """Flipping the x axis (an LAS-stored copy) leaves every measured side unchanged."""
    s = next(_study(k) for k in HONESTY_SEEDS
             if _study(k).findings["lung_nodule"]["present"] and _study(k).findings["liver_lesion"]["present"])
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = s.volume.shape[0] - 1
    las = dataclasses.replace(s, volume=s.volume[::-1].copy(), label_map=s.label_map[::-1].copy(),
                              affine=s.affine @ flip)
    assert nib.aff2axcodes(las.affine) == ("L", "A", "S")
    a, b = _measure(s), _measure(las)
    for side in ("right", "left"):
        assert [n["side"] for n in a["lungs"][side]["nodules"]] == [n["side"] for n in b["lungs"][side]["nodules"]]
    assert [x["side"] for x in a["liver"]] == [x["side"] for x in b["liver"]]
    assert np.allclose([x["x_frac"] for x in a["liver"]], [x["x_frac"] for x in b["liver"]], atol=0.02)
    assert a["lungs"]["right"]["nodules"] or a["lungs"]["left"]["nodules"]


def test_honesty_batch_covers_every_finding():
    labels = np.array([[_study(s).labels[f] for f in FINDINGS] for s in HONESTY_SEEDS])
    assert labels.any(0).all() and (~labels.astype(bool)).any(0).all()


def test_findings_prevalence():
    rng = np.random.default_rng(0)
    prev = np.mean([[sample_findings(rng)[f]["present"] for f in FINDINGS] for _ in range(3000)], 0)
    assert ((prev > 0.25) & (prev < 0.4)).all(), prev


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{[^}]+\}", template)
    return re.compile("[\\w. -]*?".join(re.escape(p) for p in parts))


RESERVED = [_template_regex(t) for f in TEMPLATES.values() for pol in f.values() for t in pol[1]]
TRAIN = {f: [_template_regex(t) for pol in d.values() for t in pol[0]] for f, d in TEMPLATES.items()}


def _sentences(report: str) -> list[str]:
    """Sentences of the FINDINGS section ("1.2 cm" has no space after its dot)."""
    body = report.split("\n\nIMPRESSION:")[0].removeprefix("FINDINGS:\n")
    return re.split(r"(?<=\.) (?=[A-Z0-9])", body)


def _uses(report: str, patterns: list[re.Pattern]) -> int:
    """Number of FINDINGS sentences that are an instance of one of ``patterns``."""
    return sum(any(p.fullmatch(s) for p in patterns) for s in _sentences(report))


def test_template_pools():
    for f, d in TEMPLATES.items():
        for pol, (train, held) in d.items():
            assert len(train) >= 3 and len(held) >= 2 and not set(train) & set(held), (f, pol)
    rng = np.random.default_rng(1)
    for i in range(300):
        findings = sample_findings(rng)
        train_report = render_report(findings, seed=i)
        assert _uses(train_report, RESERVED) == 0, train_report
        assert _uses(train_report, [p for ps in TRAIN.values() for p in ps]) == len(FINDINGS)
        test_report = render_report(findings, seed=i, reserved=True)
        # every finding sentence of a test report is a reserved paraphrase
        assert _uses(test_report, RESERVED) == len(FINDINGS), test_report
        assert _uses(test_report, [p for ps in TRAIN.values() for p in ps]) == 0, test_report


def test_zero_shot_prompts():
    assert list(ZERO_SHOT_PROMPTS) == FINDINGS
    for f, d in ZERO_SHOT_PROMPTS.items():
        assert len(d["positive"]) >= 3 and len(d["negative"]) >= 3, f
        assert not set(d["positive"]) & set(d["negative"])


def _attr_diff(a: dict, b: dict) -> list[tuple[str, str]]:
    out = []
    for f in FINDINGS:
        if a[f]["present"] != b[f]["present"]:
            out.append((f, "present"))
        elif a[f]["present"]:
            out += [(f, k) for k in a[f] if a[f][k] != b[f].get(k)]
    return out


def test_twin_reports_differ_in_exactly_one_attribute():
    rng = np.random.default_rng(2)
    kinds = set()
    for i in range(400):
        findings = sample_findings(rng)
        if findings["splenomegaly"]["present"]:
            findings["splenomegaly"]["length_cm"] = 15.0
        twin, change = twin_findings(findings, rng)
        assert _attr_diff(findings, twin) == [(change["finding"], change["attribute"])]
        kinds.add(change["attribute"])
        true = render_report(findings, seed=i)
        text = twin_report(findings, np.random.default_rng(i), seed=i)
        twin_i, _ = twin_findings(findings, np.random.default_rng(i))
        assert text == render_report(twin_i, seed=i) and text != true
        a = re.split(r"(?<=\.) ", true.split("\n\nIMPRESSION")[0])
        b = re.split(r"(?<=\.) ", text.split("\n\nIMPRESSION")[0])
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1
    assert {"present", "side", "size_mm", "kind", "zone", "grade", "lobe"} <= kinds


def test_dataset_manifest_and_determinism(tmp_path):
    m1 = generate_phantom_dataset(tmp_path / "a", n_studies=24, seed=3, shape=SMALL, progress=False)
    m2 = generate_phantom_dataset(tmp_path / "b", n_studies=24, seed=3, shape=SMALL, progress=False)
    assert m1 == tmp_path / "a" / "manifest.jsonl"
    assert m1.read_bytes() == m2.read_bytes()
    rows = [json.loads(line) for line in m1.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 24 and len({r["study_id"] for r in rows}) == 24
    for r in rows:
        assert list(r) == ["study_id", "patient_id", "image", "report", "split", "labels", "mask"]
        assert r["split"] in ("train", "val", "test") and list(r["labels"]) == FINDINGS
        assert set(r["labels"].values()) <= {0, 1}
    for rel in (rows[0]["image"], rows[0]["mask"], rows[-1]["image"]):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    img = nib.load(tmp_path / "a" / rows[0]["image"])
    mask = nib.load(tmp_path / "a" / rows[0]["mask"])
    assert img.get_data_dtype() == np.int16 and img.shape == SMALL
    assert np.allclose(img.affine, mask.affine) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    # splits by patient, ~70/10/20, and held-out phrasing only in test
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r["patient_id"], r["split"]) == r["split"]
    assert set(split_of.values()) == {"train", "val", "test"}
    assert len(split_of) < 24  # some patients have a follow-up study
    for r in rows:
        if r["split"] != "test":
            assert _uses(r["report"], RESERVED) == 0, r["report"]
        elif r["report"] != SHORT_NORMAL_REPORT:
            assert _uses(r["report"], RESERVED) == len(FINDINGS), r["report"]
    reports = [r["report"] for r in rows]
    assert len(set(reports)) < len(reports)  # identical (normal) reports form groups
    assert not list((tmp_path / "a").rglob(".tmp-*"))
