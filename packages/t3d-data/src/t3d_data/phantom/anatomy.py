"""Phantom anatomy: a sampled chest-abdomen geometry and its vectorised rendering to HU + labels.

Organs are analytic ellipsoids / elliptic cylinders evaluated only inside their bounding boxes,
with one-voxel partial-volume edges (a first-order signed distance, as in SDF renderers).

Orientation (nibabel, "Coordinate systems and affines"): world space is RAS+, i.e. +x points to
the subject's **Right**, +y Anterior, +z Superior. The voxel axes here are RAS too (positive
diagonal affine), so organs on the patient's LEFT (heart apex, spleen, aorta) lie at world x
*below* the midline and the liver at x *above* it. "Radiological" display (patient right on the
viewer's left) is only a viewing convention and plays no part here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "LESION_LABELS",
    "ORGAN_LABELS",
    "Anatomy",
    "Canvas",
    "Grid",
    "render_anatomy",
    "sample_anatomy",
    "sample_grid",
]

#: Organ label values of the label map (0 = outside the body). Lesions use LESION_LABELS.
ORGAN_LABELS: dict[str, int] = {
    "body": 1,
    "lung_right": 2,
    "lung_left": 3,
    "heart": 4,
    "aorta": 5,
    "liver": 6,
    "spleen": 7,
    "kidney_right": 8,
    "kidney_left": 9,
    "spine": 10,
    "ribs": 11,
}

#: Lesion label values; a lesion's label replaces the organ's under it.
LESION_LABELS: dict[str, int] = {
    "lung_nodule": 12,
    "pleural_effusion": 13,
    "liver_lesion": 14,
    "kidney_cyst": 15,
}

SIDES = ("right", "left")
Box = tuple[slice, slice, slice]
#: ``(box, membership)`` of a shape; both ``None`` when it misses the grid.
Shape = tuple[Box | None, np.ndarray | None]
SIDE_SIGN = {"right": 1.0, "left": -1.0}  # RAS+: patient right = +x


@dataclass(frozen=True)
class Grid:
    """Voxel grid of one study: RAS voxel order, positive-diagonal affine.

    Attributes:
        shape: ``(X, Y, Z)`` voxels.
        spacing: voxel size in mm along (x, y, z).
        origin: world position (mm) of the centre of voxel ``(0, 0, 0)``.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        """The 4x4 voxel-to-world (RAS+, mm) matrix."""
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = self.origin
        return aff


def sample_grid(
    rng: np.random.Generator,
    shape: tuple[int, int, int] | None,
    spacing: tuple[float, float, float] | None,
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Sample the voxel grid size and spacing of a study.

    The default grid varies around 128x128x112 voxels (X, Y in 112..144, Z in 96..128) with
    2.0-3.2 mm in-plane pixels and 2.5-4.0 mm slices, chosen so that the field of view holds an
    adult chest-abdomen. An explicit ``shape`` keeps a realistic field of view (the spacing
    follows); an explicit ``spacing`` is used as given.

    Args:
        rng: random generator.
        shape: ``(X, Y, Z)`` override, each >= 24.
        spacing: ``(sx, sy, sz)`` override in mm, each > 0.

    Returns:
        ``(shape, spacing)``.

    Raises:
        ValueError: on a bad shape or spacing.
    """
    fov_in, fov_z = rng.uniform(370.0, 430.0), rng.uniform(400.0, 470.0)
    if shape is None:
        dims = (int(rng.integers(112, 145)), int(rng.integers(112, 145)), int(rng.integers(96, 129)))
        # spacing varies, with a field of view large enough for an adult (>= 340 / 380 mm)
        s_in = float(rng.uniform(max(2.0, 340.0 / max(dims[:2])), 3.2))
        s_z = float(rng.uniform(max(2.5, 380.0 / dims[2]), 4.0))
    else:
        dims = tuple(int(v) for v in shape)
        if len(dims) != 3 or min(dims) < 24:
            raise ValueError(f"shape must be 3 sizes >= 24 voxels (X, Y, Z); got {shape}")
        s_in, s_z = fov_in / max(dims[:2]), fov_z / dims[2]
    if spacing is not None:
        sp = tuple(float(v) for v in spacing)
        if len(sp) != 3 or min(sp) <= 0:
            raise ValueError(f"spacing must be 3 positive sizes in mm; got {spacing}")
        return dims, sp  # type: ignore[return-value]
    return dims, (s_in, s_in, s_z)  # type: ignore[return-value]


@dataclass
class Anatomy:
    """Sampled geometry of one patient, in the *body frame* (mm).

    Body frame: x, y relative to the body axis (RAS+ directions), z relative to the top slice
    (so z <= 0). ``offset`` is the world position of the body-frame origin. Lung cavities are
    ellipsoids centred at the lung base level ``z0`` with semi-axis ``H`` upwards, cut from below
    by a diaphragm dome ``z >= z0 + dome * (1 - q_xy)`` (``q_xy`` the normalised squared radius).
    """

    grid: Grid
    offset: tuple[float, float, float]
    body: tuple[float, float]
    fat: float
    wall: float
    inner: tuple[float, float]
    apex: float
    H: float
    z0: float
    lungs: dict[str, dict[str, float]]
    heart_center: tuple[float, float, float]
    heart_semi: tuple[float, float, float]
    liver_center: tuple[float, float, float]
    liver_semi: tuple[float, float, float]
    liver_hu: float
    spleen_center: tuple[float, float, float]
    spleen_semi: tuple[float, float, float]
    kidneys: dict[str, dict[str, Any]]
    spine: dict[str, float]
    aorta: dict[str, float]
    ribs: dict[str, float]
    noise_sigma: float
    extra: dict[str, Any] = field(default_factory=dict)

    def world(self) -> dict[str, Any]:
        """Geometry in world mm (RAS+) for checks: midline, lung cavities, base/apex levels."""
        ox, oy, oz = self.offset
        lungs = {
            s: {"cx": p["cx"] + ox, "cy": p["cy"] + oy, "lx": p["lx"], "ly": p["ly"],
                "dome": p["dome"], "z0": self.z0 + oz, "H": self.H}
            for s, p in self.lungs.items()
        }
        return {"midline_x": ox, "midline_y": oy, "lung_base_z": self.z0 + oz,
                "lung_apex_z": self.apex + oz, "lungs": lungs,
                "spacing": list(self.grid.spacing), "shape": list(self.grid.shape)}


def sample_anatomy(
    rng: np.random.Generator,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    *,
    cardiomegaly: bool = False,
    splenomegaly: bool = False,
    fatty_liver: bool = False,
) -> Anatomy:
    """Sample a patient's grid and organ geometry (the same draws whatever the flags).

    Args:
        rng: random generator (anatomy stream).
        shape: grid override, see :func:`sample_grid`.
        spacing: spacing override, see :func:`sample_grid`.
        cardiomegaly: cardiothoracic ratio 0.55-0.64 instead of 0.38-0.46.
        splenomegaly: spleen length ~14-18 cm instead of ~8.5-10.5 cm.
        fatty_liver: liver -10..10 HU instead of 55..65 HU.

    Returns:
        The :class:`Anatomy`.
    """
    dims, sp = sample_grid(rng, shape, spacing)
    fov = [d * s for d, s in zip(dims, sp, strict=True)]
    u = rng.uniform(size=64)  # a fixed number of draws keeps follow-up studies comparable
    width = min(300.0 + 50.0 * u[0], 0.86 * fov[0])
    depth = min((0.62 + 0.12 * u[1]) * width, 0.86 * fov[1])
    a, b = width / 2, depth / 2
    fat, wall = 8.0 + 14.0 * u[2], 10.0 + 6.0 * u[3]
    a_in, b_in = a - fat - wall, b - fat - wall
    zf = fov[2]
    apex = -(0.02 + 0.03 * u[4]) * zf
    H = (0.44 + 0.06 * u[5]) * zf
    z0 = apex - H
    lungs: dict[str, dict[str, float]] = {}
    for i, side in enumerate(SIDES):
        lungs[side] = {
            "cx": SIDE_SIGN[side] * (0.48 + 0.02 * u[6 + i]) * a_in,
            "cy": -0.02 * b_in,
            "lx": (0.42 + 0.02 * u[8 + i]) * a_in,
            "ly": 0.76 * b_in,
            "dome": (0.16 if side == "right" else 0.12) * H * (0.8 + 0.4 * u[10 + i]),
        }
    thorax_w = (lungs["right"]["cx"] + lungs["right"]["lx"]) - (lungs["left"]["cx"] - lungs["left"]["lx"])
    ctr = 0.55 + 0.09 * u[12] if cardiomegaly else 0.38 + 0.08 * u[12]
    hx = ctr * thorax_w / 2
    hy = (0.38 + 0.07 * u[13]) * b_in * (1.12 if cardiomegaly else 1.0)
    hz = (0.22 + 0.05 * u[14]) * H * (1.1 if cardiomegaly else 1.0)
    heart_c = (-0.3 * hx, 0.14 * b_in, z0 + 0.5 * lungs["left"]["dome"] + hz)
    lsx = (0.52 + 0.08 * u[15]) * a_in
    liver_semi = (lsx, 0.7 * b_in, (0.16 + 0.03 * u[16]) * zf)
    liver_c = (0.88 * a_in - lsx, -0.05 * b_in, z0 + 0.7 * lungs["right"]["dome"] - 0.75 * liver_semi[2])
    liver_hu = -10.0 + 20.0 * u[17] if fatty_liver else 55.0 + 10.0 * u[17]
    scale_z = zf / 440.0
    if splenomegaly:
        spl_semi = (0.16 * a_in * 1.2, 0.42 * b_in * 1.15, (88.0 + 14.0 * u[18]) * scale_z)
    else:
        spl_semi = ((0.12 + 0.03 * u[19]) * a_in, (0.36 + 0.06 * u[20]) * b_in,
                    (42.0 + 10.0 * u[18]) * scale_z)
    spl_c = (-(0.8 * a_in - spl_semi[0]), -0.3 * b_in, z0 - 0.45 * spl_semi[2])
    ry = 15.0 + 3.0 * u[21]
    y_sp = -b_in + ry + 14.0  # vertebral body; the neural arch reaches into the back muscles
    kid_z = z0 - (0.2 + 0.04 * u[22]) * zf
    kidneys = {}
    for i, side in enumerate(SIDES):
        kidneys[side] = {
            "center": (SIDE_SIGN[side] * (55.0 + 10.0 * u[23 + i]) * a_in / 150.0,
                       y_sp + 4.0 + 8.0 * u[25 + i],
                       kid_z - (0.02 + 0.02 * u[27]) * zf * (side == "right")),
            "semi": (24.0 + 6.0 * u[28 + i], 22.0 + 5.0 * u[30 + i], (48.0 + 8.0 * u[32 + i]) * scale_z),
            "hu": 35.0 + 10.0 * u[34 + i],
        }
    spine = {"y": y_sp, "rx": 18.0 + 4.0 * u[36], "ry": ry, "period": 26.0 + 6.0 * u[37],
             "phase": 30.0 * u[38], "canal_r": 7.0 + 2.0 * u[39]}
    r_ao = 10.0 + 4.0 * u[40]
    aorta = {"x": -(14.0 + 8.0 * u[41]), "y": y_sp + ry + r_ao + 3.0 + 4.0 * u[42], "r": r_ao,
             "top": z0 + (0.3 + 0.1 * u[43]) * H,
             "hu": 170.0 + 60.0 * u[44] if u[45] < 0.3 else 40.0 + 10.0 * u[44]}
    ribs = {"period": 24.0 + 6.0 * u[46], "phase": 24.0 * u[47]}
    # body centre: slightly off the array centre, arbitrary scanner coordinates (RAS+ world)
    ci = ((dims[0] - 1) / 2 + (u[48] - 0.5) * 0.06 * dims[0],
          (dims[1] - 1) / 2 + (u[49] - 0.5) * 0.04 * dims[1])
    offset_w = (-20.0 + 40.0 * u[50], -40.0 + 30.0 * u[51], -100.0 + 200.0 * u[52])
    origin = (offset_w[0] - ci[0] * sp[0], offset_w[1] - ci[1] * sp[1],
              offset_w[2] - (dims[2] - 1) * sp[2])
    grid = Grid(shape=dims, spacing=sp, origin=origin)
    return Anatomy(
        grid=grid, offset=offset_w, body=(a, b), fat=fat, wall=wall, inner=(a_in, b_in),
        apex=apex, H=H, z0=z0, lungs=lungs, heart_center=heart_c, heart_semi=(hx, hy, hz),
        liver_center=liver_c, liver_semi=liver_semi, liver_hu=liver_hu,
        spleen_center=spl_c, spleen_semi=spl_semi, kidneys=kidneys, spine=spine, aorta=aorta,
        ribs=ribs, noise_sigma=10.0 + 10.0 * u[53],
        extra={"ctr": ctr},
    )


class Canvas:
    """HU volume + label map under construction, painted shape by shape (later wins).

    Args:
        anatomy: the geometry; coordinates passed to the methods are in its body frame.
    """

    def __init__(self, anatomy: Anatomy) -> None:
        g = anatomy.grid
        self.vol = np.full(g.shape, -1000.0, dtype=np.float32)
        self.lab = np.zeros(g.shape, dtype=np.uint8)
        self.ax = [
            (g.origin[i] + g.spacing[i] * np.arange(g.shape[i]) - anatomy.offset[i]).astype(np.float32)
            for i in range(3)
        ]
        self.h = float(np.cbrt(np.prod(g.spacing)))

    def box(self, lo: tuple[float, ...], hi: tuple[float, ...]) -> Box | None:
        """Index box covering body-frame ``[lo, hi]`` plus an edge margin; ``None`` if empty."""
        out = []
        for i in range(3):
            i0 = int(np.searchsorted(self.ax[i], lo[i] - 2 * self.h))
            i1 = int(np.searchsorted(self.ax[i], hi[i] + 2 * self.h))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return out[0], out[1], out[2]

    def coords(self, sl: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable body-frame coordinates ``(x[:,1,1], y[1,:,1], z[1,1,:])`` of a box."""
        return (self.ax[0][sl[0]][:, None, None], self.ax[1][sl[1]][None, :, None],
                self.ax[2][sl[2]][None, None, :])

    def soft(self, dist: np.ndarray) -> np.ndarray:
        """Partial-volume membership of a signed distance (mm, negative inside)."""
        return np.clip(0.5 - dist / self.h, 0.0, 1.0).astype(np.float32)

    def ellipsoid_dist(self, sl: Box, c: tuple[float, ...],
                       s: tuple[float, ...]) -> np.ndarray:
        """First-order signed distance (mm) to an axis-aligned ellipsoid."""
        x, y, z = self.coords(sl)
        u = [(x - c[0]) / s[0], (y - c[1]) / s[1], (z - c[2]) / s[2]]
        r = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
        g = np.sqrt((u[0] / s[0]) ** 2 + (u[1] / s[1]) ** 2 + (u[2] / s[2]) ** 2)
        grad = np.maximum(g / np.maximum(r, 1e-6), 1.0 / max(s))
        return (r - 1.0) / grad

    def ellipsoid(self, c: tuple[float, ...], s: tuple[float, ...]) -> Shape:
        """``(box, membership)`` of an ellipsoid; box is ``None`` when outside the grid."""
        sl = self.box(tuple(c[i] - s[i] for i in range(3)), tuple(c[i] + s[i] for i in range(3)))
        if sl is None:
            return None, None
        return sl, self.soft(self.ellipsoid_dist(sl, c, s))

    def cylinder(self, cx: float, cy: float, sx: float, sy: float, z_lo: float, z_hi: float,
                 sl: Box | None = None) -> Shape:
        """``(box, membership)`` of an elliptic cylinder along z between ``z_lo`` and ``z_hi``.

        ``sl`` evaluates it on a given box instead of its own bounding box.
        """
        if sl is None:
            sl = self.box((cx - sx, cy - sy, z_lo), (cx + sx, cy + sy, z_hi))
        if sl is None:
            return None, None
        x, y, z = self.coords(sl)
        u, v = (x - cx) / sx, (y - cy) / sy
        r = np.sqrt(u**2 + v**2)
        grad = np.maximum(np.sqrt((u / sx) ** 2 + (v / sy) ** 2) / np.maximum(r, 1e-6), 1.0 / max(sx, sy))
        m_xy = self.soft((r - 1.0) / grad)
        m_z = self.soft(np.maximum(z_lo - z, z - z_hi))
        return sl, np.minimum(m_xy, m_z)

    def paint(self, sl: Box | None, m: np.ndarray | None, hu: float | np.ndarray,
              label: int | None) -> None:
        """Blend ``hu`` into the box with membership ``m``; label voxels with ``m >= 0.5``."""
        if sl is None or m is None:
            return
        v = self.vol[sl]
        v += (np.float32(hu) - v) * m if np.isscalar(hu) else (hu - v) * m
        if label is not None:
            self.lab[sl][m >= 0.5] = label

    def lung_cavity(self, an: Anatomy, side: str) -> Shape:
        """``(box, membership)`` of one hemithorax cavity (ellipsoid above the dome)."""
        p = an.lungs[side]
        c, s = (p["cx"], p["cy"], an.z0), (p["lx"], p["ly"], an.H)
        sl, m = self.ellipsoid(c, s)
        if sl is None:
            return None, None
        x, y, z = self.coords(sl)
        q = np.clip(((x - c[0]) / s[0]) ** 2 + ((y - c[1]) / s[1]) ** 2, 0.0, 1.0)
        return sl, np.minimum(m, self.soft(an.z0 + p["dome"] * (1.0 - q) - z))


def render_anatomy(cv: Canvas, an: Anatomy, effusion: dict[str, Any] | None = None) -> None:
    """Paint the normal anatomy (plus a pleural effusion, which shapes the lungs) into ``cv``.

    Args:
        cv: the canvas.
        an: the geometry.
        effusion: ``{"sides": [...], "fd": depth fraction, "fh": height fraction}`` or ``None``.
    """
    L = ORGAN_LABELS
    a, b = an.body
    a_in, b_in = an.inner
    z_lo, z_hi = float(cv.ax[2][0]) - 10, float(cv.ax[2][-1]) + 10
    sl, m = cv.cylinder(0.0, 0.0, a, b, z_lo, z_hi)
    cv.paint(sl, m, -100.0, L["body"])  # subcutaneous fat
    sl, m = cv.cylinder(0.0, 0.0, a - an.fat, b - an.fat, z_lo, z_hi)
    cv.paint(sl, m, 45.0, L["body"])  # muscle wall
    sl, m = cv.cylinder(0.0, 0.0, a_in, b_in, z_lo, z_hi)
    _, _, z = cv.coords(sl)
    interior = np.where(z > an.z0, np.float32(-70.0), np.float32(25.0))  # mediastinal fat / abdomen
    cv.paint(sl, m, interior, L["body"])
    # ribs in the inner part of the wall, thorax only, with an anterior cartilage gap
    sl, m_out = cv.cylinder(0.0, 0.0, a_in + 0.8 * an.wall, b_in + 0.8 * an.wall, an.z0 - 30, an.apex + 10)
    if sl is not None:
        _, m_in = cv.cylinder(0.0, 0.0, a_in + 0.2 * an.wall, b_in + 0.2 * an.wall, an.z0 - 30,
                              an.apex + 10, sl=sl)
        x, y, z = cv.coords(sl)
        pat = np.clip((np.sin(2 * np.pi * (z - an.ribs["phase"]) / an.ribs["period"]) - 0.55) * 4, 0, 1)
        gap = ~((y > 0.5 * b_in) & (np.abs(x) < 35.0))
        cv.paint(sl, np.minimum(m_out, 1 - m_in) * pat * gap, 550.0, L["ribs"])
    # abdominal organs (lungs painted after them carve the domes)
    # liver = right lobe + an anterior-medial left lobe, evaluated on the union's box
    lc, ls = an.liver_center, an.liver_semi
    left_c = (-0.05 * a_in, 0.35 * b_in, lc[2] + 0.2 * ls[2])
    left_s = (0.3 * a_in, 0.3 * b_in, 0.55 * ls[2])
    sl = cv.box(tuple(min(lc[i] - ls[i], left_c[i] - left_s[i]) for i in range(3)),
                tuple(max(lc[i] + ls[i], left_c[i] + left_s[i]) for i in range(3)))
    m = np.maximum(cv.soft(cv.ellipsoid_dist(sl, lc, ls)), cv.soft(cv.ellipsoid_dist(sl, left_c, left_s)))
    x, y, _ = cv.coords(sl)
    ao = an.aorta  # keep the liver off the spine / aorta column (it lies anterior-right of it)
    m *= 1.0 - cv.soft(x - (ao["x"] + ao["r"] + 12.0)) * cv.soft(y - (ao["y"] + ao["r"] + 6.0))
    cv.paint(sl, m, an.liver_hu, L["liver"])
    cv.paint(*cv.ellipsoid(an.spleen_center, an.spleen_semi), 50.0, L["spleen"])
    for side in SIDES:
        k = an.kidneys[side]
        cv.paint(*cv.ellipsoid(k["center"], k["semi"]), k["hu"], L[f"kidney_{side}"])
    for side in SIDES:
        sl, m = cv.lung_cavity(an, side)
        cv.paint(sl, m, -850.0, L[f"lung_{side}"])
        if effusion is not None and side in effusion["sides"]:
            p = an.lungs[side]
            x, y, z = cv.coords(sl)
            dp, hf = 2 * p["ly"] * effusion["fd"], an.H * effusion["fh"]
            w = (y - (p["cy"] - p["ly"])) / dp + (z - an.z0) / hf
            m_w = cv.soft((w - 1.0) / np.sqrt(1 / dp**2 + 1 / hf**2))
            cv.paint(sl, np.minimum(m, m_w), effusion["hu"], LESION_LABELS["pleural_effusion"])
    cv.paint(*cv.ellipsoid(an.heart_center, an.heart_semi), 40.0, L["heart"])
    cv.paint(*cv.cylinder(ao["x"], ao["y"], ao["r"], ao["r"], z_lo, ao["top"]), ao["hu"], L["aorta"])
    sp = an.spine
    sl, m = cv.cylinder(0.0, sp["y"], sp["rx"], sp["ry"], z_lo, an.apex + 20)
    if sl is not None:
        _, _, z = cv.coords(sl)
        disc = np.mod(z - sp["phase"], sp["period"]) < 6.0
        cv.paint(sl, m, np.where(disc, np.float32(80.0), np.float32(650.0)), L["spine"])
        _, m2 = cv.cylinder(0.0, sp["y"], sp["rx"] - 3, sp["ry"] - 3, z_lo, an.apex + 20, sl=sl)
        cv.paint(sl, m2 * ~disc, 400.0, L["spine"])  # cancellous core
    cy_canal = sp["y"] - sp["ry"] - sp["canal_r"] - 2.0
    cv.paint(*cv.cylinder(0.0, cy_canal, sp["canal_r"] + 6, sp["canal_r"] + 6, z_lo, an.apex + 20),
             600.0, L["spine"])  # neural arch
    cv.paint(*cv.cylinder(0.0, cy_canal, sp["canal_r"], sp["canal_r"], z_lo, an.apex + 20),
             15.0, L["spine"])  # spinal canal (CSF)
