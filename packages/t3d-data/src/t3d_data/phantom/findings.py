"""Phantom findings: sampled attributes and their rendering into the volume and label map.

Each finding is sampled once as a small attribute dict; the same dict drives both the rendered
HU (this module) and the report sentences (:mod:`t3d_data.phantom.reports`), so report and image
agree by construction. Lesions are placed by rejection sampling on the organ label map.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from t3d_data.phantom.anatomy import LESION_LABELS, ORGAN_LABELS, SIDES, Anatomy, Canvas

__all__ = [
    "EFFUSION_FRACTIONS",
    "FINDINGS",
    "GRADES",
    "ZONES",
    "effusion_params",
    "render_lesions",
    "sample_attributes",
    "sample_findings",
    "zone_of",
]

#: Binary findings, in the order of the ``labels`` dict and of report sentences.
FINDINGS: list[str] = [
    "lung_nodule",
    "pleural_effusion",
    "liver_lesion",
    "kidney_cyst",
    "cardiomegaly",
    "splenomegaly",
    "fatty_liver",
]

ZONES = ("lower", "middle", "upper")
GRADES = ("small", "moderate", "large")
EFFUSION_SIDES = ("right", "left", "bilateral")
#: (depth fraction of the lung's AP extent, height fraction of the lung height) per grade.
EFFUSION_FRACTIONS = {"small": (0.32, 0.28), "moderate": (0.52, 0.46), "large": (0.7, 0.64)}
#: Nodule centres are drawn well inside their zone (fraction of lung height above the base).
_ZONE_BANDS = {"lower": (0.08, 0.28), "middle": (0.4, 0.6), "upper": (0.7, 0.86)}
#: Liver lobes by the lesion centre's fraction of the liver's width from its LEFT edge (min x).
_LOBE_BANDS = {"left": (0.1, 0.28), "right": (0.45, 0.85)}
#: Diameter ranges (mm); lesions stay >= ~4 voxels across at the default spacing.
SIZE_RANGES = {"lung_nodule": (8, 25), "liver_lesion": (12, 36), "kidney_cyst": (14, 26)}
P_NORMAL, P_FINDING = 0.2, 0.4


def zone_of(z_fraction: float) -> str:
    """Lung zone of a height fraction above the lung base (thirds)."""
    return ZONES[min(2, max(0, int(z_fraction * 3)))]


def sample_attributes(finding: str, rng: np.random.Generator) -> dict[str, Any]:
    """Attributes of a present finding (uniform over its options).

    Args:
        finding: one of :data:`FINDINGS`.
        rng: random generator.

    Returns:
        ``{"present": True, ...attributes}``.
    """
    u = rng.uniform(size=4)
    lo, hi = SIZE_RANGES.get(finding, (0, 0))
    size = int(lo + u[2] * (hi - lo + 1))
    if finding == "lung_nodule":
        return {"present": True, "side": SIDES[int(u[0] < 0.5)], "zone": ZONES[int(u[1] * 3)],
                "size_mm": size}
    if finding == "pleural_effusion":
        return {"present": True, "side": EFFUSION_SIDES[int(u[0] * 3)], "grade": GRADES[int(u[1] * 3)]}
    if finding == "liver_lesion":
        lobe = "right" if u[1] < 0.65 else "left"
        if lobe == "left":
            size = int(lo + u[2] * 11)  # the left lobe is thinner: 12-22 mm
        return {"present": True, "kind": "cyst" if u[0] < 0.5 else "hyperdense", "lobe": lobe,
                "size_mm": size}
    if finding == "kidney_cyst":
        return {"present": True, "side": SIDES[int(u[0] < 0.5)], "size_mm": size}
    if finding == "splenomegaly":
        return {"present": True, "length_cm": round(13.5 + 3.5 * u[0], 1)}
    if finding in FINDINGS:
        return {"present": True}
    raise ValueError(f"unknown finding {finding!r}; expected one of {FINDINGS}")


def sample_findings(rng: np.random.Generator) -> dict[str, dict[str, Any]]:
    """Sample one study's findings: 20% normal studies, otherwise each finding with p=0.4.

    Prevalence is therefore ~32% per finding. A splenomegaly's ``length_cm`` is a placeholder
    until the study measures the rendered spleen. A hepatic cyst is not drawn in a fatty liver (both
    are near water attenuation, so the cyst would be invisible); it becomes hyperdense.

    Args:
        rng: random generator (findings stream).

    Returns:
        ``{finding: {"present": bool, ...}}`` in :data:`FINDINGS` order.
    """
    u = rng.uniform(size=len(FINDINGS) + 1)
    normal = u[0] < P_NORMAL
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(FINDINGS):
        attrs = sample_attributes(name, rng)  # always drawn: a fixed number of draws
        out[name] = attrs if (not normal and u[i + 1] < P_FINDING) else {"present": False}
    if out["fatty_liver"]["present"] and out["liver_lesion"].get("kind") == "cyst":
        out["liver_lesion"]["kind"] = "hyperdense"
    return out


def _ball_offsets(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    r = [int(np.ceil(radius_mm / s)) for s in spacing]
    g = np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in r], indexing="ij"), -1).reshape(-1, 3)
    d = np.sqrt(((g * np.asarray(spacing)) ** 2).sum(1))
    return g[d <= radius_mm]


def _place_ball(lab: np.ndarray, label: int, candidates: np.ndarray, radius_mm: float,
                spacing: tuple[float, float, float], rng: np.random.Generator,
                tries: int = 256) -> np.ndarray | None:
    """A candidate voxel whose ball of ``radius_mm`` lies entirely in ``label``, or ``None``."""
    if len(candidates) == 0:
        return None
    pick = candidates[rng.choice(len(candidates), size=min(tries, len(candidates)), replace=False)]
    off = _ball_offsets(radius_mm, spacing)
    idx = pick[:, None, :] + off[None, :, :]
    inside = ((idx >= 0) & (idx < np.asarray(lab.shape))).all(-1).all(-1)
    idx = np.clip(idx, 0, np.asarray(lab.shape) - 1)
    ok = inside & (lab[idx[..., 0], idx[..., 1], idx[..., 2]] == label).all(-1)
    hits = np.flatnonzero(ok)
    return pick[hits[0]] if len(hits) else None


def _paint_sphere(cv: Canvas, voxel: np.ndarray, diameter_mm: float, hu: float, label: int,
                  rng: np.random.Generator) -> None:
    jitter = (rng.uniform(size=3) - 0.5) * 0.5 * np.asarray([cv.ax[i][1] - cv.ax[i][0] for i in range(3)])
    c = tuple(float(cv.ax[i][voxel[i]] + jitter[i]) for i in range(3))
    r = diameter_mm / 2
    cv.paint(*cv.ellipsoid(c, (r, r, r)), hu, label)


def _lesion(cv: Canvas, an: Anatomy, finding: str, attrs: dict[str, Any], organ: int,
            mask: np.ndarray, hu: float, margin_mm: float, rng: np.random.Generator) -> dict[str, Any]:
    """Place and paint a spherical lesion inside ``organ`` voxels of ``mask``; shrink if needed."""
    sp = an.grid.spacing
    cand = np.argwhere(mask)
    size, floor = float(attrs["size_mm"]), float(SIZE_RANGES[finding][0])
    for _ in range(6):
        vox = _place_ball(cv.lab, organ, cand, size / 2 + margin_mm, sp, rng)
        if vox is not None:
            _paint_sphere(cv, vox, size, hu, LESION_LABELS[finding], rng)
            return {**attrs, "size_mm": int(size)}
        if size <= floor:
            break
        size = max(floor, round(size * 0.85))
    return {"present": False}


def render_lesions(cv: Canvas, an: Anatomy, findings: dict[str, dict[str, Any]],
                   rng: np.random.Generator) -> dict[str, dict[str, Any]]:
    """Paint nodule, liver lesion and kidney cyst; returns the findings as rendered.

    A lesion that cannot be placed at its size shrinks (not below its size range), and is dropped
    (absent) only if even that fails, so the returned attributes always describe the volume.

    Args:
        cv: canvas with the anatomy (and effusion) already painted.
        an: the geometry.
        findings: sampled findings.
        rng: random generator (findings stream).

    Returns:
        A copy of ``findings`` with sizes as rendered.
    """
    out = copy.deepcopy(findings)
    margin = max(3.0, 1.5 * cv.h)
    f = out["lung_nodule"]
    if f["present"]:
        lo, hi = _ZONE_BANDS[f["zone"]]
        zf = (cv.ax[2] - an.z0) / an.H
        organ = ORGAN_LABELS[f"lung_{f['side']}"]
        mask = (cv.lab == organ) & ((zf >= lo) & (zf <= hi))[None, None, :]
        out["lung_nodule"] = _lesion(cv, an, "lung_nodule", f, organ, mask,
                                     float(rng.uniform(25, 45)), margin, rng)
    f = out["liver_lesion"]
    if f["present"]:
        organ = ORGAN_LABELS["liver"]
        liver = cv.lab == organ
        xs = np.flatnonzero(liver.any((1, 2)))
        x0, x1 = cv.ax[0][xs[0]], cv.ax[0][xs[-1]]
        frac = (cv.ax[0] - x0) / max(x1 - x0, 1e-6)
        lo, hi = _LOBE_BANDS[f["lobe"]]
        mask = liver & ((frac >= lo) & (frac <= hi))[:, None, None]
        hu = float(rng.uniform(0, 10) if f["kind"] == "cyst" else rng.uniform(120, 140))
        out["liver_lesion"] = _lesion(cv, an, "liver_lesion", f, organ, mask, hu,
                                      max(8.0, 2.5 * cv.h), rng)
    f = out["kidney_cyst"]
    if f["present"]:
        organ = ORGAN_LABELS[f"kidney_{f['side']}"]
        out["kidney_cyst"] = _lesion(cv, an, "kidney_cyst", f, organ, cv.lab == organ,
                                     float(rng.uniform(0, 6)), max(4.0, 2.0 * cv.h), rng)
    return out


def effusion_params(attrs: dict[str, Any], rng: np.random.Generator) -> dict[str, Any] | None:
    """Rendering parameters of a pleural effusion (``None`` when absent)."""
    u = rng.uniform(size=3)
    if not attrs["present"]:
        return None
    fd, fh = EFFUSION_FRACTIONS[attrs["grade"]]
    sides = list(SIDES) if attrs["side"] == "bilateral" else [attrs["side"]]
    return {"sides": sides, "fd": fd * (0.92 + 0.16 * u[0]), "fh": fh * (0.92 + 0.16 * u[1]),
            "hu": 5.0 + 10.0 * u[2]}
