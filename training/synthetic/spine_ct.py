"""Deterministic synthetic spine CT with VerSe-style vertebra labels.

The spine is laid out from C1 to the sacrum along a gently curved sagittal line (cervical lordosis,
thoracic kyphosis, lumbar lordosis, a sacrum tilted ~40 deg). Each vertebra has a body (cancellous
~250 HU, cortical shell ~750 HU), pedicles, laminae, articular, transverse and spinous processes,
with sizes graded caudally. Cues that identify levels in a partial field of view: the atlas ring and
dens (C1/C2), small cervical bodies, ribs on T1-T12 only (T11 short, T12 shorter), lungs beside the
thoracic spine, long lumbar transverse processes and no ribs, the sacrum with its alae and the ilia.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.synthetic.phantom import (
    Grid,
    clip_box,
    local_box,
    noisy_int16,
    paint_capsule,
    soft_weight,
)
from training.synthetic.truth import SyntheticVolume, Vertebra

__all__ = ["LEVELS", "Vertebra", "generate_spine_ct"]

LEVELS: list[tuple[str, int]] = (
    [(f"C{i}", i) for i in range(1, 8)]
    + [(f"T{i}", 7 + i) for i in range(1, 13)]
    + [(f"L{i}", 19 + i) for i in range(1, 6)]
    + [("S1", 26)]
)
CANCELLOUS_HU, CORTICAL_HU, DISC_HU, SHELL_MM = 250.0, 750.0, 80.0, 1.6
SACRUM_H = 95.0
# A level is annotated (VerSe centroid list) when at least this fraction of its bone is in view; below it
# only a neighbour's spinous or articular process reaches into the field of view (measured: 0.00-0.35
# against >= 0.83 for the levels of the window), which no reader would label. The label map keeps them.
MIN_VISIBLE_FRACTION = 0.5


@dataclass(frozen=True)
class _Level:
    label: str
    index: int
    centre: np.ndarray  # body centre (x, y, z) mm; for S1 the centre of the upper endplate
    up: np.ndarray  # superior axis (0, uy, uz)
    height: float
    ra: float  # body half-width (lateral)
    rp: float  # body half-depth (AP)
    disc_below: float


def _level_dims(label: str) -> tuple[float, float, float, float]:
    """(height, half-width, half-depth, disc below) in mm for a level, before the body-size scale."""
    region, n = label[0], int(label[1:])
    if region == "C":
        t = (n - 1) / 6
        return (10.0 if n == 1 else 15.0 if n > 2 else 18.0), 8 + 4 * t, 7.5 + 2 * t, 0.0 if n <= 2 else 5.0
    if region == "T":
        t = (n - 1) / 11
        return 18 + 7 * t, 13 + 8 * t, 11 + 6 * t, 5 + 2.5 * t
    if region == "L":
        t = (n - 1) / 4
        return 27 + 3 * t, 22 + 4 * t, 17 + 2 * t, 10 + 1.5 * t
    return SACRUM_H, 25.0, 18.0, 0.0


def spine_layout(rng: np.random.Generator, x0: float, y0: float, z_c1_top: float, scale: float) -> list[_Level]:
    """All 25 levels stacked from C1 downwards with seeded curvature; positions in patient mm."""
    amp_c, amp_t, amp_l = rng.uniform(6, 12), rng.uniform(15, 28), rng.uniform(12, 22)
    s, arcs, dims = 0.0, [], []
    for label, _ in LEVELS:
        h, ra, rp, disc = (v * scale for v in _level_dims(label))
        arcs.append(s + (0.0 if label == "S1" else h / 2))
        dims.append((h, ra, rp, disc))
        s += h + disc
    idx = {lab: i for i, (lab, _) in enumerate(LEVELS)}
    s_t1, s_l1, s_s1 = arcs[idx["T1"]], arcs[idx["L1"]], arcs[idx["S1"]]

    def y_of(a: float) -> float:
        if a < s_t1:
            return -amp_c * np.sin(np.pi * a / s_t1)
        if a < s_l1:
            return amp_t * np.sin(np.pi * (a - s_t1) / (s_l1 - s_t1))
        if a < s_s1:
            return -amp_l * np.sin(np.pi * (a - s_l1) / (s_s1 - s_l1))
        return np.tan(np.radians(40)) * (a - s_s1)

    levels = []
    for (label, index), a, (h, ra, rp, disc) in zip(LEVELS, arcs, dims, strict=True):
        dy = (y_of(a + 1.0) - y_of(a - 1.0)) / 2.0
        if label == "S1":
            dy = np.tan(np.radians(40))
        up = np.array([0.0, -dy, 1.0]) / np.hypot(dy, 1.0)
        centre = np.array([x0, y0 + y_of(a), z_c1_top - a], dtype=np.float64)
        levels.append(_Level(label, index, centre, up, h, ra, rp, disc))
    return levels


def _capsule_depth(a, p, h, q0, q1, r):  # noqa: ANN001, ANN202 - numpy broadcasting helper
    d = np.subtract(q1, q0, dtype=np.float32)
    ra, rp, rh = a - q0[0], p - q0[1], h - q0[2]
    length2 = float(d @ d) or 1e-6
    t = np.clip((ra * d[0] + rp * d[1] + rh * d[2]) / length2, 0.0, 1.0)
    return r - np.sqrt((ra - t * d[0]) ** 2 + (rp - t * d[1]) ** 2 + (rh - t * d[2]) ** 2)


def _posterior_elements(lv: _Level, scale: float) -> list[tuple[tuple, tuple, float]]:
    """Capsules (q0, q1, radius) in the local (a, p, h) frame for pedicles, laminae and processes."""
    region, n = lv.label[0], int(lv.label[1:])
    H, ra, rp = lv.height, lv.ra, lv.rp
    cr = {"C": 7.0, "T": 6.5, "L": 8.5}[region] * scale
    pc = rp + cr + 1.0
    ped, lam, sp_r, art = {"C": (2.2, 2.0, 2.5, 3.2), "T": (3.5, 3.0, 3.0, 3.5), "L": (5.0, 3.5, 4.5, 4.5)}[region]
    sp_len, sp_drop = {"C": (22.0 if n == 7 else 12.0, 4.0), "T": (28.0, 18.0), "L": (28.0, 4.0)}[region]
    tp_len, tp_back, tp_r = {"C": (ra + 12, -2.0, 2.5), "T": (ra + 18, 10.0, 4.0), "L": (ra + 26, 3.0, 3.5)}[region]
    if region == "L":
        tp_len += {1: -6.0, 2: 0.0, 3: 6.0, 4: 2.0, 5: -4.0}[n]
    tip = (0.0, pc + cr + 3.0, -0.15 * H)
    caps: list[tuple[tuple, tuple, float]] = []
    for sg in (-1.0, 1.0):
        junction = (sg * (cr + 2.0), pc, 0.0)
        caps += [
            ((sg * (cr + 1.5), rp - 2.0, 0.0), junction, ped * scale),
            (junction, tip, lam * scale),
            (junction, (sg * tp_len, pc + tp_back, 0.0), tp_r * scale),
            ((sg * (cr + 3.0), pc + 1.0, -H / 2 - 1.0), (sg * (cr + 3.0), pc + 1.0, H / 2 + 1.0), art * scale),
        ]
    caps.append((tip, (0.0, tip[1] + sp_len * scale, tip[2] - sp_drop * scale), sp_r * scale))
    if region == "L":  # tall, blade-like lumbar spinous process
        caps.append(((0.0, tip[1], tip[2] - 6.0), (0.0, tip[1] + sp_len * scale, tip[2] - 10.0), sp_r * scale))
    if lv.label == "C1":  # atlas: anterior arch and lateral masses instead of a body
        caps += [((-12.0, -6.0, 0.0), (0.0, -10.0, 0.0), 3.5), ((12.0, -6.0, 0.0), (0.0, -10.0, 0.0), 3.5)]
        caps += [((sg * 14.0, 0.0, -5.0), (sg * 14.0, 0.0, 5.0), 7.0) for sg in (-1.0, 1.0)]
    if lv.label == "C2":  # dens projecting into the atlas ring
        caps.append(((0.0, -2.0, H / 2), (0.0, -3.0, H / 2 + 12.0), 5.0))
    return caps


class _Frame:
    """Maps local (a, p, h) boxes of one vertebra to sub-slices of its index box."""

    def __init__(self, grid: Grid, lv: _Level, box: tuple[slice, slice, slice]) -> None:
        self.grid, self.lv, self.box = grid, lv, box
        self.uy, self.uz = float(lv.up[1]), float(lv.up[2])

    def sub(self, q0, q1, r: float) -> tuple[slice, slice, slice]:  # noqa: ANN001
        pts = []
        for a, p, h in (q0, q1):
            c = self.lv.centre
            pts.append((c[0] + a, c[1] + p * self.uz + h * self.uy, c[2] - p * self.uy + h * self.uz))
        arr = np.asarray(pts)
        m = r + self.grid.edge
        full = self.grid.box(arr.min(0) - m, arr.max(0) + m, clip=False)
        assert full is not None
        out = []
        for i in range(3):
            n = self.box[i].stop - self.box[i].start
            a_ = int(np.clip(full[i].start - self.box[i].start, 0, n))
            b_ = int(np.clip(full[i].stop - self.box[i].start, 0, n))
            out.append(slice(a_, max(a_, b_)))
        return out[0], out[1], out[2]


def _vertebra_depth(lv: _Level, a, p, h, scale: float, frame: _Frame) -> np.ndarray:  # noqa: ANN001
    """Signed depth (mm, positive inside bone) of one vertebra in its local frame (a: 1x1xX, p/h: ZxYx1)."""
    shape = (p.shape[0], p.shape[1], a.shape[2])
    if lv.label == "S1":
        t = np.clip(-h / SACRUM_H, 0.0, 1.0)
        half_w = (50.0 - 38.0 * t) * scale
        half_d = (18.0 - 8.0 * t) * scale
        pcen = 6.0 * t * scale
        q = np.sqrt((a / half_w) ** 2 + ((p - pcen) / half_d) ** 2)
        depth = np.minimum(np.minimum(-h, SACRUM_H + h), (1.0 - q) * half_d)
        canal = _capsule_depth(a, p, h, (0.0, 12.0 * scale, 5.0), (0.0, 10.0 * scale, -0.7 * SACRUM_H), 6.0)
        crest = _capsule_depth(a, p, h, (0.0, 24.0 * scale, -8.0), (0.0, 16.0 * scale, -60.0), 4.0)
        return np.maximum(np.minimum(depth, -canal), crest).astype(np.float32)
    depth = np.full(shape, -100.0, dtype=np.float32)
    if lv.label != "C1":
        sb = frame.sub((-lv.ra, -lv.rp, -lv.height / 2), (lv.ra, lv.rp, lv.height / 2), max(lv.ra, lv.rp))
        sa, sp, sh = a[:, :, sb[2]], p[sb[0], sb[1]], h[sb[0], sb[1]]
        q = np.sqrt((sa / lv.ra) ** 2 + (sp / lv.rp) ** 2)
        depth[sb] = np.minimum(lv.height / 2 - np.abs(sh), (1.0 - q) * min(lv.ra, lv.rp))
    for q0, q1, r in _posterior_elements(lv, scale):
        sb = frame.sub(q0, q1, r)
        d = _capsule_depth(a[:, :, sb[2]], p[sb[0], sb[1]], h[sb[0], sb[1]], q0, q1, r)
        np.maximum(depth[sb], d, out=depth[sb])
    return depth


def render_vertebra(
    vol: np.ndarray, grid: Grid, lv: _Level, scale: float, cancellous: float, label_map: np.ndarray | None
) -> int:
    """Paint one vertebra (and its label, if `label_map` is given); returns its total voxel count.

    The count includes voxels outside the grid, so callers can tell how much of a level is in view.
    """
    if lv.label == "S1":
        lo, hi = (-55.0 * scale, -20.0 * scale, -SACRUM_H - 2), (55.0 * scale, 32.0 * scale, 3.0)
    else:
        ext = lv.ra + 40.0 * scale
        lo = (-ext, -lv.rp - 12.0, -lv.height / 2 - 30.0 * scale)
        hi = (ext, lv.rp + 60.0 * scale, lv.height / 2 + 20.0)
    res = local_box(grid, lv.centre, lv.up, lo, hi)
    if res is None:
        return 0
    box, a, p, h = res
    depth = _vertebra_depth(lv, a[:1, :1], p, h, scale, _Frame(grid, lv, box))
    total = int(np.count_nonzero(depth > 0))
    gbox, loc = clip_box(grid, box)
    depth = depth[loc]
    if depth.size == 0:
        return total
    target = np.where(depth > SHELL_MM, np.float32(cancellous), np.float32(CORTICAL_HU))
    sub = vol[gbox]
    sub += soft_weight(depth, grid.edge) * (target - sub)
    if label_map is not None:
        lab = label_map[gbox]
        lab[(depth > 0) & (lab == 0)] = lv.index
    return total


def render_disc(vol: np.ndarray, grid: Grid, upper: _Level, lower: _Level) -> None:
    """Paint the intervertebral disc between two consecutive bodies (~80 HU)."""
    bottom = lower.centre if lower.label == "S1" else lower.centre + lower.up * lower.height / 2
    top = upper.centre - upper.up * upper.height / 2
    centre, up = (top + bottom) / 2, top - bottom
    thick = float(np.linalg.norm(up)) + 2.0
    ra, rp = (upper.ra + lower.ra) / 2, (upper.rp + lower.rp) / 2
    res = local_box(grid, centre, up, (-ra - 2, -rp - 2, -thick / 2), (ra + 2, rp + 2, thick / 2))
    if res is None:
        return
    box, a, p, h = res
    depth = np.minimum(thick / 2 - np.abs(h), (1.0 - np.sqrt((a / ra) ** 2 + (p / rp) ** 2)) * min(ra, rp))
    gbox, loc = clip_box(grid, box)
    sub = vol[gbox]
    sub += soft_weight(depth[loc], grid.edge) * (DISC_HU - sub)


# Rib cage per thoracic level: lateral radius (mm), end angle (rad from posterior), anterior drop (mm).
_RIB_RX = [72, 95, 110, 120, 128, 132, 134, 134, 132, 128, 122, 116]
_RIB_END = [2.5, 2.6, 2.6, 2.6, 2.6, 2.6, 2.6, 2.45, 2.35, 2.2, 1.5, 0.95]
_RIB_DROP = [30, 45, 55, 60, 65, 65, 65, 60, 55, 50, 40, 30]


def rib_radius(label: str, rx_max: float) -> float:
    """Lateral radius (mm) of the rib cage at thoracic level `label` for a cage of maximum radius rx_max."""
    return _RIB_RX[int(label[1:]) - 1] / max(_RIB_RX) * rx_max


def render_ribs(
    vol: np.ndarray, grid: Grid, lv: _Level, scale: float, rx_max: float | None = None, ry_ratio: float = 0.72
) -> None:
    """Paint the pair of ribs of thoracic level `lv` as chains of capsules (cortex + marrow).

    The ribs leave the vertebral body, pass the transverse process, curve round the cage (lateral
    radius graded T1 < T7, maximum `rx_max`) and descend anteriorly; T11 and T12 are short floating ribs.
    """
    j = int(lv.label[1:]) - 1
    rx = rib_radius(lv.label, max(_RIB_RX) * scale if rx_max is None else rx_max)
    drop = _RIB_DROP[j] * scale
    ry = rx * ry_ratio
    cx, cy, cz = lv.centre
    y_ring = cy + 32.0 * scale - ry
    phi0 = 0.3
    n = max(3, int(np.ceil(rx * (_RIB_END[j] - phi0) / 18.0)))
    phis = np.linspace(phi0, _RIB_END[j], n)
    r = (5.0 if j == 0 else 4.0) * scale
    for sg in (-1.0, 1.0):
        pts = [np.array([cx + sg * (lv.ra + 1.0), cy + 0.3 * lv.rp, cz + 0.25 * lv.height])]
        for ph in phis:
            f = ((ph - phi0) / (np.pi - phi0)) ** 1.4
            pts.append(np.array([cx + sg * rx * np.sin(ph), y_ring + ry * np.cos(ph), cz - drop * f]))
        for q0, q1 in zip(pts[:-1], pts[1:], strict=True):
            paint_capsule(vol, grid, q0, q1, r, CORTICAL_HU - 100.0)
            paint_capsule(vol, grid, q0, q1, r - 1.5, 200.0)


def render_ilia(vol: np.ndarray, grid: Grid, sacrum: _Level, scale: float) -> None:
    """Paint both iliac wings as a fan of capsules from the sacroiliac joints to the iliac crests."""
    c = sacrum.centre
    for sg in (-1.0, 1.0):
        joint = c + np.array([sg * 42.0, 18.0, -30.0]) * scale
        crest = [c + np.array([sg * (70.0 + 12 * k), 25.0 - 18.0 * k, 30.0 - 3 * k]) * scale for k in range(5)]
        for q in crest:
            paint_capsule(vol, grid, joint, q, 6.0 * scale, 450.0)
        for q0, q1 in zip(crest[:-1], crest[1:], strict=True):
            paint_capsule(vol, grid, q0, q1, 5.0 * scale, CORTICAL_HU)
        paint_capsule(vol, grid, joint, c + np.array([sg * 85.0, -40.0, -95.0]) * scale, 8.0 * scale, 450.0)


def _context_slice(x: np.ndarray, y: np.ndarray, z: float, levels: list[_Level], scale: float) -> np.ndarray:
    """Soft tissue, fat and (beside the thoracic spine) lungs for one axial slice of the spine CT."""
    zs = np.array([lv.centre[2] for lv in levels])
    i = int(np.clip(np.searchsorted(-zs, -z), 0, len(levels) - 1))
    region = levels[i].label[0]
    ref = levels[i]
    half_a = {"C": 60.0, "T": 150.0, "L": 145.0, "S": 165.0}[region] * scale
    half_b = {"C": 55.0, "T": 110.0, "L": 110.0, "S": 110.0}[region] * scale
    cy = ref.centre[1] + 50.0 * scale - half_b
    q = np.sqrt((x / half_a) ** 2 + ((y - cy) / half_b) ** 2)
    out = np.full(q.shape, -1000.0, dtype=np.float32)
    out[q < 1.0] = -100.0
    inner = q < 1.0 - 18.0 * scale / half_b
    out[inner] = 40.0
    if region == "T":
        t1, t12 = levels[7].centre[2], levels[18].centre[2]
        frac = np.clip((t1 + 15 - z) / (t1 - t12 + 15), 0.0, 1.0)
        shrink = np.sqrt(np.clip(frac / 0.15, 0, 1)) * np.clip((1.0 - frac) / 0.1, 0.05, 1.0)
        for sg in (-1.0, 1.0):
            lx, la = sg * 0.5 * half_a, 0.36 * half_a * shrink
            ly, lb = cy - 5.0 * scale, 0.72 * half_b * shrink
            lung = ((x - lx) / max(la, 1e-3)) ** 2 + ((y - ly) / max(lb, 1e-3)) ** 2 < 1.0
            out[lung & inner] = -850.0
    return out


def generate_spine_ct(
    seed: int, slices: int | None = None, rows: int = 512, spacing: tuple[float, float, float] | None = None
) -> SyntheticVolume:
    """Synthetic spine CT over a seeded window of 5-12 consecutive levels (C1..S1).

    `label_map` holds the VerSe index of every vertebra voxel in view; `vertebrae` lists each level with
    at least MIN_VISIBLE_FRACTION of its bone in view, its centroid being the centroid of its voxels in
    view (LPS mm).
    """
    rng = np.random.default_rng([seed, 2])
    scale = rng.uniform(0.92, 1.08)
    levels = spine_layout(rng, x0=rng.uniform(-5, 5), y0=rng.uniform(10, 30), z_c1_top=0.0, scale=scale)
    n_levels = int(rng.integers(5, 13))
    start = int(rng.integers(0, len(levels) - n_levels + 1))
    window = levels[start : start + n_levels]
    top = window[0].centre[2] + window[0].height / 2 + rng.uniform(2, 10)
    last = window[-1]
    bottom = (last.centre[2] - SACRUM_H * 0.8) if last.label == "S1" else last.centre[2] - last.height / 2
    bottom -= rng.uniform(2, 10)
    if spacing is None:
        fov = rng.uniform(220.0, 320.0)
        px = fov / rows
        dz = float(rng.choice([0.625, 1.0, 1.25, 1.5, 2.0, 2.5])) if slices is None else (top - bottom) / slices
        dz = float(np.clip(dz, 0.5, 3.0))
        spacing = (dz, px, px)
    dz, sy, sx = (float(v) for v in spacing)
    n_slices = int(slices) if slices is not None else max(1, int(np.ceil((top - bottom) / dz)))
    z0 = (top + bottom) / 2 - (n_slices - 1) * dz / 2
    spine_y = float(np.mean([lv.centre[1] for lv in window]))
    origin = (
        float(window[0].centre[0] - (rows - 1) / 2 * sx),
        float(spine_y - 25.0 - (rows - 1) / 2 * sy),
        float(z0),
    )
    grid = Grid((n_slices, rows, rows), (dz, sy, sx), origin)
    xs, ys, zs = grid.axis(2)[None, :], grid.axis(1)[:, None], grid.axis(0)
    vol = np.empty(grid.shape, dtype=np.float32)
    for k, z in enumerate(zs):
        vol[k] = _context_slice(xs, ys, float(z), levels, scale)
    label_map = np.zeros(grid.shape, dtype=np.uint8)
    cancellous = rng.uniform(200.0, 280.0)
    for upper, lower in zip(levels[:-1], levels[1:], strict=True):
        if upper.label not in ("C1",):
            render_disc(vol, grid, upper, lower)
    for lv in levels:
        if lv.label.startswith("T"):
            render_ribs(vol, grid, lv, scale)
    render_ilia(vol, grid, levels[-1], scale)
    totals = {lv.index: render_vertebra(vol, grid, lv, scale, cancellous, label_map) for lv in levels}
    hu = noisy_int16(vol, rng, sigma=float(rng.uniform(15, 25)))
    vertebrae = []
    nz = np.flatnonzero(label_map)
    labs = label_map.ravel()[nz]
    kk, rr, cc = np.unravel_index(nz, label_map.shape)
    counts = np.bincount(labs, minlength=27)
    sums = [np.bincount(labs, weights=v.astype(np.float64), minlength=27) for v in (kk, rr, cc)]
    for label, index in LEVELS:
        if counts[index] and counts[index] >= MIN_VISIBLE_FRACTION * totals[index]:
            k, r, c = (s_[index] / counts[index] for s_ in sums)
            vertebrae.append(Vertebra(label, index, grid_to_patient(grid, k, r, c)))
    return SyntheticVolume(hu, grid.spacing, grid.origin, label_map, [], vertebrae, "SPINE")


def grid_to_patient(grid: Grid, k: float, r: float, c: float) -> tuple[float, float, float]:
    """Patient (x, y, z) mm of a (fractional) voxel index."""
    return (
        float(grid.origin[0] + c * grid.spacing[2]),
        float(grid.origin[1] + r * grid.spacing[1]),
        float(grid.origin[2] + k * grid.spacing[0]),
    )
