"""Deterministic synthetic chest CT with lung nodules (LUNA16-style ground truth).

Anatomy: body (muscle ~45 HU, subcutaneous fat ~-100 HU, air outside), thoracic spine and ribs
(shared with `spine_ct`), sternum, heart with pericardial fat, descending aorta, liver and stomach
(with a gas bubble) under the diaphragm domes, two lungs (~-850 HU, denser posteriorly) filled
with branching vessel trees (~+40 HU, elongated tubes that look like nodules in one slice) and
airways (air lumen, soft-tissue wall). Nodules: 3-30 mm, solid (~+40 HU), part-solid (ground glass
with a solid core) or ground glass (~-600 HU), some juxtapleural; all centred inside the lungs and
inside the field of view. Noise: Gaussian 15-25 HU with slight in-plane correlation.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from training.synthetic.phantom import (
    Grid,
    grow_tree,
    noisy_int16,
    paint_capsule,
    soft_weight,
)
from training.synthetic.spine_ct import render_disc, render_ribs, render_vertebra, rib_radius, spine_layout
from training.synthetic.truth import Nodule, SyntheticVolume

__all__ = ["NODULE_KINDS", "Nodule", "generate_chest_ct", "paint_nodule", "sample_diameter_mm"]

NODULE_KINDS = ("solid", "part-solid", "ground-glass")
JUXTAPLEURAL_FRACTION = 0.3   # of the nodules, by default (the held-out sets' mix)


class _Chest:
    """Analytic thorax: rib-cage ring, lungs, heart and aorta as functions of patient (x, y, z)."""

    def __init__(self, rng: np.random.Generator, scale: float, half_a: float, half_b: float) -> None:
        self.s, self.A, self.B = scale, half_a, half_b
        levels = spine_layout(rng, x0=0.0, y0=0.0, z_c1_top=0.0, scale=scale)
        thoracic = [lv for lv in levels if lv.label.startswith("T")]
        shift = half_b - 82.0 * scale - max(lv.centre[1] for lv in thoracic)
        z_shift = -thoracic[0].centre[2]  # T1 body centre at z = 0
        self.levels = [replace(lv, centre=lv.centre + np.array([0.0, shift, z_shift])) for lv in levels]
        tl = [lv for lv in self.levels if lv.label.startswith("T")][::-1]  # ascending z
        self.rx_max = half_a - 24.0
        self.ry_ratio = (half_b - 36.0) / self.rx_max
        self.tz = np.array([lv.centre[2] for lv in tl])
        self.rx_t = np.array([rib_radius(lv.label, self.rx_max) for lv in tl])
        self.yvb_t = np.array([lv.centre[1] for lv in tl])
        self.ra_t = np.array([lv.ra for lv in tl])
        self.rp_t = np.array([lv.rp for lv in tl])
        t11 = self.levels[17]
        self.z_apex = self.tz[-1] + rng.uniform(8, 18)
        self.z_base = t11.centre[2] - rng.uniform(0, 15)
        self.dome_h = rng.uniform(45, 70) * scale
        self.z_carina = float(self.levels[10].centre[2] - self.levels[10].height / 2)  # T4/T5 disc
        self.heart_c = np.array([18.0 * scale, 0.0, self.z_base + self.dome_h + 35.0 * scale])
        self.heart_r = np.array([62.0, 48.0, 58.0]) * scale * rng.uniform(0.9, 1.1)
        rx, ry, yr, *_ = self.ring(self.heart_c[2])
        self.heart_c[1] = yr - 0.32 * ry
        self.stomach_gas = rng.uniform() < 0.7

    def ring(self, z):  # noqa: ANN001, ANN201 - scalar or array z
        rx = np.interp(z, self.tz, self.rx_t)
        ry = rx * self.ry_ratio
        yvb = np.interp(z, self.tz, self.yvb_t)
        return rx, ry, yvb + 32.0 * self.s - ry, yvb, np.interp(z, self.tz, self.ra_t), np.interp(z, self.tz, self.rp_t)

    def dome(self, x, y, right: bool):  # noqa: ANN001, ANN201
        """z of the diaphragm surface under the right or left lung at (x, y) (domes under T11's ring)."""
        rx, ry, yr, *_ = self.ring(self.z_base)
        sg = -1.0 if right else 1.0
        d = np.clip(1 - ((x - sg * 0.5 * rx) / (0.75 * rx)) ** 2 - ((y - yr + 0.1 * ry) / (0.85 * ry)) ** 2, 0, 1)
        return self.z_base + (self.dome_h + (12.0 * self.s if right else 0.0)) * d

    def domes(self, x, y):  # noqa: ANN001, ANN201
        """(diaphragm z under the lung on the side of x, right dome z, left dome z)."""
        right, left = self.dome(x, y, True), self.dome(x, y, False)
        return np.where(x < 0, right, left), right, left

    def heart(self, x, y, z, grow: float = 0.0):  # noqa: ANN001, ANN201
        c, r = self.heart_c, self.heart_r + grow
        return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 < 1.0

    def aorta(self, x, y, z, grow: float = 0.0):  # noqa: ANN001, ANN201
        _, _, _, yvb, ra, _ = self.ring(z)
        r = 12.0 * self.s + grow
        top = np.maximum(z - self.z_carina - 20.0, 0.0)
        return (x - ra - 14.0 * self.s) ** 2 + (y - yvb + 4.0) ** 2 + top * top < r * r

    def lung(self, x, y, z, dome=None):  # noqa: ANN001, ANN201
        """True inside either lung (broadcasting over x, y, z arrays; `dome` = precomputed domes()[0])."""
        rx, ry, yr, yvb, ra, rp = self.ring(z)
        f = np.clip((self.z_apex - z) / (40.0 * self.s), 0.0, 1.0)
        shrink = np.sqrt(1.0 - (1.0 - f) ** 2)
        la, lb = (rx - 7.0) * shrink + 1e-3, (ry - 7.0) * shrink + 1e-3
        yl = yr + (1.0 - shrink) * 0.4 * ry
        inside = (x / la) ** 2 + ((y - yl) / lb) ** 2 < 1.0
        inside &= np.abs(x) > 18.0 * self.s
        inside &= ~((np.abs(x) < ra + 8.0) & (y > yvb - rp - 4.0))
        inside &= z > (self.domes(x, y)[0] if dome is None else dome)
        inside &= ~self.heart(x, y, z, 4.0) & ~self.aorta(x, y, z, 3.0)
        return inside


def _context_slice(ch: _Chest, x: np.ndarray, y: np.ndarray, z: float, base: np.ndarray, domes: tuple) -> tuple:
    """HU of one axial slice before tubes, bones and nodules, and its lung mask."""
    out = base.copy()
    rx, ry, yr, yvb, ra, rp = ch.ring(z)
    cavity = (x / rx) ** 2 + ((y - yr) / ry) ** 2 < 1.0
    out[cavity] = 35.0
    dome, right_dome, left_dome = domes
    liver = cavity & (x < 30.0 * ch.s) & (z < right_dome - 1.0)
    out[liver] = 60.0
    stomach = cavity & (x >= 30.0 * ch.s) & (z < left_dome - 2.0) & (y < yr + 0.3 * ry)
    out[stomach] = 30.0
    if ch.stomach_gas:
        out[stomach & (z > left_dome - 28.0 * ch.s) & (y < yr - 0.1 * ry)] = -1000.0
    out[ch.heart(x, y, z, 4.0) & cavity] = -80.0
    out[ch.heart(x, y, z)] = 40.0
    out[ch.aorta(x, y, z)] = 45.0
    lung = ch.lung(x, y, z, dome)
    grad = (-865.0 + 35.0 * (y - yr) / ry).astype(np.float32)
    out[lung] = np.broadcast_to(grad, out.shape)[lung]
    if ch.z_base + ch.dome_h - 10.0 < z < ch.z_apex - 25.0:  # sternum
        q = (x / (14.0 * ch.s)) ** 2 + ((y - (yr - ry + 3.0)) / (6.0 * ch.s)) ** 2
        out[q < 1.0] = 600.0
        out[q < 0.45] = 220.0
    return out, lung


def sample_diameter_mm(rng: np.random.Generator) -> float:
    """Nodule diameter 3-30 mm, skewed to small ones (mean ~10 mm), as in screening cohorts."""
    return 3.0 + 27.0 * float(rng.beta(1.2, 3.5))


def _place_nodules(
    rng: np.random.Generator, ch: _Chest, count: int, z_lo: float, z_hi: float, grid: Grid,
    juxtapleural_fraction: float,
) -> list[Nodule]:
    """Seeded nodule centres: inside a lung, within [z_lo, z_hi] and the in-plane FOV, not overlapping; each
    juxtapleural (touching the pleura) with probability `juxtapleural_fraction`."""
    dirs = rng.standard_normal((40, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    xy_lo = np.array(grid.origin[:2]) + 5.0
    xy_hi = xy_lo + (np.array(grid.shape[:0:-1]) - 1) * np.array(grid.spacing[:0:-1]) - 10.0
    out: list[Nodule] = []
    for _ in range(count):
        for _attempt in range(300):
            d = float(np.clip(sample_diameter_mm(rng), 3.0, min(30.0, (z_hi - z_lo) - 2.0)))
            r = d / 2
            jp = bool(rng.uniform() < juxtapleural_fraction)
            kind = str(rng.choice(NODULE_KINDS, p=[0.6, 0.2, 0.2]))
            c = np.array([rng.uniform(-ch.A, ch.A), rng.uniform(-ch.B, ch.B), rng.uniform(z_lo + r, z_hi - r)])
            if not ch.lung(c[0], c[1], c[2]):
                continue
            if jp:  # march outwards (lateral or posterior) to the pleura, then back in by ~r
                theta = rng.uniform(-1.2, 1.2)
                step = np.array([np.sign(c[0]) * np.cos(theta), np.sin(theta), 0.0])
                ts = np.arange(0.0, 200.0, 0.5)
                path = c[None, :] + ts[:, None] * step[None, :]
                outside = ~ch.lung(path[:, 0], path[:, 1], path[:, 2])
                if not outside.any():
                    continue
                c = c + (ts[np.argmax(outside)] - 0.85 * r) * step
                probe = c[None, :] + dirs * (0.55 * r)
            else:
                probe = c[None, :] + dirs * (r + 3.0)
            if not ch.lung(probe[:, 0], probe[:, 1], probe[:, 2]).all() or not (z_lo + r <= c[2] <= z_hi - r):
                continue
            if np.any(c[:2] < xy_lo) or np.any(c[:2] > xy_hi):
                continue
            if any(np.linalg.norm(c - np.array(n.centre_mm)) < r + n.diameter_mm / 2 + 3.0 for n in out):
                continue
            out.append(Nodule((float(c[0]), float(c[1]), float(c[2])), round(d, 2), kind, jp))
            break
    return out


def paint_nodule(vol: np.ndarray, labels: np.ndarray, grid: Grid, n: Nodule, rng: np.random.Generator) -> None:
    """Paint one lobulated nodule (and label 1 where it is) around its centre."""
    r = n.diameter_mm / 2
    c = np.asarray(n.centre_mm, dtype=np.float32)
    box = grid.box(c - r * 1.3 - grid.edge, c + r * 1.3 + grid.edge)
    if box is None:
        return
    x, y, z = grid.coords(box)
    dx, dy, dz = x - c[0], y - c[1], z - c[2]
    dist = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
    lob = np.zeros_like(dist)
    for _ in range(3):
        u = rng.standard_normal(3)
        u /= np.linalg.norm(u)
        lob += rng.uniform(0.02, 0.07) * np.cos(rng.integers(2, 5) * (dx * u[0] + dy * u[1] + dz * u[2]) / dist * np.pi)
    r_eff = r * (1.0 + lob)
    sub = vol[box]
    solid = float(rng.uniform(20.0, 60.0))
    if n.kind == "solid":
        sub += soft_weight(r_eff - dist, grid.edge) * (solid - sub)
    else:
        ggo = -600.0 + rng.normal(0.0, 35.0, dist.shape).astype(np.float32)
        sub += soft_weight(r_eff - dist, grid.edge) * (ggo - sub)
        if n.kind == "part-solid":
            sub += soft_weight(0.5 * r_eff - dist, grid.edge) * (solid - sub)
    labels[box][dist <= r_eff] = 1


def _default_spacing(rng: np.random.Generator, rows: int) -> tuple[float, float, float]:
    px = rng.uniform(0.62, 0.82) * 512.0 / rows
    return float(rng.choice([0.625, 1.0, 1.25, 1.5, 2.0, 2.5])), float(px), float(px)


def _paint_body(rng: np.random.Generator, ch: _Chest, grid: Grid, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Body, fat, lungs, heart and aorta slice by slice, then discs, ribs and vertebrae: (HU volume, lung mask)."""
    xs, ys = grid.axis(2)[None, :], grid.axis(1)[:, None]
    qb = (xs / ch.A) ** 2 + (ys / ch.B) ** 2
    base = np.full(qb.shape, -1000.0, dtype=np.float32)
    base[qb < 1.0] = -100.0
    fat = rng.uniform(8.0, 25.0) * scale
    base[(xs / (ch.A - fat)) ** 2 + (ys / (ch.B - fat)) ** 2 < 1.0] = 45.0
    vol = np.empty(grid.shape, dtype=np.float32)
    lung_mask = np.empty(grid.shape, dtype=bool)
    domes = ch.domes(xs, ys)
    for k, z in enumerate(grid.axis(0)):
        vol[k], lung_mask[k] = _context_slice(ch, xs, ys, float(z), base, domes)
    for upper, lower in zip(ch.levels[:-1], ch.levels[1:], strict=True):
        render_disc(vol, grid, upper, lower)
    cancellous = rng.uniform(200.0, 280.0)
    for lv in ch.levels:
        if lv.label.startswith("T"):
            render_ribs(vol, grid, lv, scale, ch.rx_max, ch.ry_ratio)
        render_vertebra(vol, grid, lv, scale, cancellous, None)
    return vol, lung_mask


def _paint_vessels_and_airways(rng: np.random.Generator, ch: _Chest, grid: Grid, vol: np.ndarray,
                               lung_mask: np.ndarray, scale: float) -> None:
    """Pulmonary arteries and veins (branching trees inside the lungs), trachea, main bronchi and airway trees."""
    def inside(p: np.ndarray) -> np.ndarray:
        return ch.lung(p[:, 0], p[:, 1], p[:, 2])

    sx = grid.spacing[2]
    min_r = max(0.5, 0.35 * sx)
    budget = 220
    car = ch.z_carina
    _, _, _, yvb_c, _, rp_c = ch.ring(car)
    y_tr = float(yvb_c - rp_c - 22.0 * scale)
    for sg in (-1.0, 1.0):
        for dy_, dz_, r0 in ((5.0, -20.0, 7.0), (-8.0, -50.0, 6.0)):  # pulmonary artery, vein
            start = np.array([sg * 22.0 * scale, y_tr + dy_, car + dz_ * scale])
            for direction in ((sg, -0.3, 0.9), (sg, -0.4, -0.1), (sg, 0.2, -0.9), (0.3 * sg, 0.8, 0.2)):
                for p0, p1, ra, rb in grow_tree(rng, start, np.array(direction), r0 * scale * 0.8, inside,
                                                min_radius=min_r, budget=budget):
                    paint_capsule(vol, grid, p0, p1, ra, 40.0, r1=rb, where=lung_mask)
    trachea = np.array([0.0, y_tr, car])
    paint_capsule(vol, grid, trachea + np.array([0.0, -8.0, 200.0]), trachea, 9.0 * scale, -1000.0)
    for sg in (-1.0, 1.0):
        hilum = trachea + np.array([sg * 35.0, 8.0, -25.0]) * scale
        paint_capsule(vol, grid, trachea, hilum, 6.0 * scale, -1000.0)
        for direction in ((sg, 0.0, 0.8), (sg, 0.3, -0.6)):
            for p0, p1, ra, rb in grow_tree(rng, hilum, np.array(direction), 5.0 * scale, inside,
                                            min_radius=max(1.0, 0.5 * sx), budget=budget // 4):
                wall = max(0.6, 0.2 * ra)
                paint_capsule(vol, grid, p0, p1, ra + wall, 10.0, r1=rb + wall, where=lung_mask)
                paint_capsule(vol, grid, p0, p1, ra, -1000.0, r1=rb)


def generate_chest_ct(
    seed: int,
    slices: int | None = None,
    nodules: int | None = None,
    rows: int = 512,
    spacing: tuple[float, float, float] | None = None,
    juxtapleural_fraction: float = JUXTAPLEURAL_FRACTION,
) -> SyntheticVolume:
    """Synthetic chest CT: `rows` x `rows` axial slices, seeded anatomy, spacing and nodules.

    spacing None -> seeded (slice 0.625-2.5 mm, in-plane 0.62-0.82 mm at 512 rows, scaled so the FOV
    stays ~320-420 mm); slices None -> cover the lungs (~250-350 mm); nodules None -> 0-4 (seeded).
    With fewer slices the FOV is a seeded window through the lungs and every nodule lies inside it.
    `juxtapleural_fraction` of the nodules touch the pleura (the default keeps every seed's CT as it was).
    """
    rng = np.random.default_rng([seed, 1])
    dz, sy, sx = _default_spacing(rng, rows) if spacing is None else (float(v) for v in spacing)
    fov = rows * sx
    scale = float(rng.uniform(0.92, 1.08))
    half_a = min(rng.uniform(150.0, 170.0) * scale, 0.47 * fov)
    half_b = min(rng.uniform(105.0, 120.0) * scale, 0.36 * fov)
    ch = _Chest(rng, scale, half_a, half_b)
    lung_h = ch.z_apex - ch.z_base
    if slices is None:
        slices = int(np.ceil(max(rng.uniform(250.0, 350.0), lung_h + 20.0) / dz))
    extent = (slices - 1) * dz
    if extent >= lung_h + 10.0:
        z0 = ch.z_base - rng.uniform(5.0, extent - lung_h - 5.0)
    else:
        z0 = rng.uniform(ch.z_base + 15.0, max(ch.z_base + 15.0, ch.z_apex - 15.0 - extent))
    origin = (-(rows - 1) / 2 * sx, -(rows - 1) / 2 * sy + rng.uniform(-10, 10), float(z0))
    grid = Grid((int(slices), rows, rows), (dz, sy, sx), origin)
    count = int(rng.integers(0, 5)) if nodules is None else int(nodules)
    vol, lung_mask = _paint_body(rng, ch, grid, scale)
    _paint_vessels_and_airways(rng, ch, grid, vol, lung_mask, scale)
    label_map = np.zeros(grid.shape, dtype=np.uint8)
    z_lo, z_hi = float(grid.origin[2]) + 2.0, float(grid.origin[2]) + extent - 2.0
    found = _place_nodules(rng, ch, count, z_lo, z_hi, grid, juxtapleural_fraction)
    for n in found:
        paint_nodule(vol, label_map, grid, n, rng)
    hu = noisy_int16(vol, rng, sigma=float(rng.uniform(15.0, 25.0)))
    return SyntheticVolume(hu, grid.spacing, grid.origin, label_map, found, [], "CHEST")
