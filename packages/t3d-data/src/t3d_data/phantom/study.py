"""One phantom CT-report study: sample findings and anatomy, render the volume, write the report.

The volume, label map and report all come from one attribute dict per finding, so the report
states what the volume shows (checked by the package's honesty test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from t3d_data.phantom.anatomy import ORGAN_LABELS, Canvas, render_anatomy, sample_anatomy
from t3d_data.phantom.findings import (
    FINDINGS,
    effusion_params,
    render_lesions,
    sample_findings,
)
from t3d_data.phantom.reports import render_report

__all__ = ["PhantomStudy", "generate_study"]

SeedLike = int | np.random.Generator | np.random.SeedSequence | list[int] | tuple[int, ...]


@dataclass(frozen=True, eq=False)
class PhantomStudy:
    """A synthetic chest-abdomen CT with its report.

    Attributes:
        volume: int16 HU, shape ``(X, Y, Z)``, RAS voxel order.
        affine: 4x4 voxel-to-world matrix (RAS+, mm).
        label_map: uint8 labels (:data:`ORGAN_LABELS`, :data:`LESION_LABELS`; 0 = air).
        findings: ``{finding: {"present": bool, ...attributes}}`` as rendered.
        report: report text (``FINDINGS:`` and ``IMPRESSION:`` sections).
        labels: ``{finding: 0/1}`` in :data:`FINDINGS` order.
        report_seed: template-choice seed of the report (for twin reports).
        reserved: whether the report uses the reserved (test-only) paraphrases.
        short_normal: whether the report is the fixed all-normal text.
        anatomy: world-frame geometry (midline, lung cavities, base/apex levels; mm).
    """

    volume: np.ndarray
    affine: np.ndarray
    label_map: np.ndarray
    findings: dict[str, dict[str, Any]]
    report: str
    labels: dict[str, int]
    report_seed: int
    reserved: bool
    short_normal: bool
    anatomy: dict[str, Any]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (x, y, z)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


def _as_rng(seed: SeedLike) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer | np.random.SeedSequence | list | tuple):
        raise TypeError(f"rng_or_seed must be an int, a seed sequence or a numpy Generator; got {seed!r}")
    return np.random.default_rng(seed)


def _texture(shape: tuple[int, int, int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Smooth low-frequency HU texture (coarse noise, trilinear upsampling)."""
    coarse = rng.standard_normal(tuple(max(2, s // 8) for s in shape)).astype(np.float32)
    zoom = [s / c for s, c in zip(shape, coarse.shape, strict=True)]
    out = ndimage.zoom(coarse, zoom, order=1, grid_mode=False)
    out = out[: shape[0], : shape[1], : shape[2]]
    pad = [(0, s - o) for s, o in zip(shape, out.shape, strict=True)]
    return np.pad(out, pad, mode="edge") * np.float32(sigma)


def build_study(anat_rng: np.random.Generator, find_rng: np.random.Generator,
                shape: tuple[int, int, int] | None = None,
                spacing: tuple[float, float, float] | None = None,
                reserved: bool = False) -> PhantomStudy:
    """Generate a study from separate anatomy and findings streams.

    Follow-up studies of one patient share ``anat_rng``'s seed (same body and grid) and differ
    in ``find_rng`` (findings, noise, report).

    Args:
        anat_rng: anatomy stream.
        find_rng: findings / noise / report stream.
        shape: grid override.
        spacing: spacing override (mm).
        reserved: write the report with the reserved paraphrases (test split).

    Returns:
        The :class:`PhantomStudy`.
    """
    findings = sample_findings(find_rng)
    eff = effusion_params(findings["pleural_effusion"], find_rng)
    report_seed = int(find_rng.integers(2**31))
    short_u = float(find_rng.uniform())
    an = sample_anatomy(anat_rng, shape, spacing,
                        cardiomegaly=findings["cardiomegaly"]["present"],
                        splenomegaly=findings["splenomegaly"]["present"],
                        fatty_liver=findings["fatty_liver"]["present"])
    cv = Canvas(an)
    render_anatomy(cv, an, eff)
    findings = render_lesions(cv, an, findings, find_rng)
    if findings["splenomegaly"]["present"]:
        ks = np.flatnonzero((cv.lab == ORGAN_LABELS["spleen"]).any((0, 1)))
        length_mm = (ks[-1] - ks[0] + 1) * an.grid.spacing[2] if len(ks) else 0.0
        findings["splenomegaly"]["length_cm"] = round(float(length_mm) / 10, 1)
    vol = cv.vol
    vol += _texture(an.grid.shape, find_rng, 3.0)
    vol += find_rng.standard_normal(an.grid.shape, dtype=np.float32) * np.float32(an.noise_sigma)
    volume = np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
    short_normal = short_u < 0.75
    report = render_report(findings, seed=report_seed, reserved=reserved, short_normal=short_normal)
    return PhantomStudy(
        volume=volume, affine=an.grid.affine, label_map=cv.lab, findings=findings, report=report,
        labels={f: int(findings[f]["present"]) for f in FINDINGS}, report_seed=report_seed,
        reserved=reserved, short_normal=short_normal and not any(findings[f]["present"] for f in FINDINGS),
        anatomy=an.world(),
    )


def generate_study(rng_or_seed: SeedLike, shape: tuple[int, int, int] | None = None,
                   spacing: tuple[float, float, float] | None = None, *,
                   reserved: bool = False) -> PhantomStudy:
    """Generate one synthetic chest-abdomen CT study and its report, deterministically.

    Args:
        rng_or_seed: a seed (int or sequence) or a numpy ``Generator``.
        shape: ``(X, Y, Z)``; default varies per study around 128x128x112.
        spacing: voxel size in mm; default varies (2.0-3.2 mm in-plane, 2.5-4 mm slices).
        reserved: write the report with the reserved (test-split) paraphrases.

    Returns:
        The :class:`PhantomStudy`.

    Example:
        >>> s = generate_study(0, shape=(64, 64, 56))
        >>> s.volume.dtype, s.volume.shape, s.report.startswith("FINDINGS:")
        (dtype('int16'), (64, 64, 56), True)
    """
    rng = _as_rng(rng_or_seed)
    return build_study(rng, rng, shape, spacing, reserved)
