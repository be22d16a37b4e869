"""Shared shape helpers for the synthetic CT phantoms.

Conventions (used by every generator and by `dicom_writer`):
- arrays are [Z, Y, X]; Z = slice index with increasing patient z (inferior -> superior);
- patient coordinates are DICOM LPS millimetres (+x patient left, +y posterior, +z superior);
- voxel (k, r, c) has its centre at (origin_x + c*sx, origin_y + r*sy, origin_z + k*sz).

Painting works on a float32 HU volume in place, inside the axis-aligned bounding box of each shape,
with a one-voxel soft edge so small structures get a realistic partial-volume rim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.synthetic.truth import SyntheticVolume

__all__ = ["Grid", "SyntheticVolume", "grow_tree", "local_box", "noisy_int16", "paint_capsule", "soft_weight"]

AIR_HU = -1000.0


@dataclass(frozen=True)
class Grid:
    """Voxel grid geometry: shape (Z, Y, X), spacing (z, y, x) mm, origin (x, y, z) mm."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axis(self, i: int) -> np.ndarray:
        """Patient coordinates along array axis i (0 -> z, 1 -> y, 2 -> x), float32."""
        o = self.origin[2 - i]
        return (o + np.arange(self.shape[i], dtype=np.float32) * self.spacing[i]).astype(np.float32)

    @property
    def edge(self) -> float:
        """Soft-edge width in mm (the in-plane pixel size)."""
        return float(self.spacing[2])

    def box(self, lo: np.ndarray, hi: np.ndarray, clip: bool = True) -> tuple[slice, slice, slice] | None:
        """Index slices (z, y, x) covering patient box [lo, hi] (x, y, z); None if outside the grid."""
        out = []
        for i in range(3):
            p = 2 - i  # patient axis for array axis i
            a = int(np.floor((lo[p] - self.origin[p]) / self.spacing[i]))
            b = int(np.ceil((hi[p] - self.origin[p]) / self.spacing[i])) + 1
            if clip:
                a, b = max(a, 0), min(b, self.shape[i])
            if b <= a:
                return None
            out.append(slice(a, b))
        return out[0], out[1], out[2]

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable patient (x, y, z) coordinate arrays for an index box (may exceed the grid)."""
        zs = self.origin[2] + np.arange(box[0].start, box[0].stop, dtype=np.float32) * self.spacing[0]
        ys = self.origin[1] + np.arange(box[1].start, box[1].stop, dtype=np.float32) * self.spacing[1]
        xs = self.origin[0] + np.arange(box[2].start, box[2].stop, dtype=np.float32) * self.spacing[2]
        return xs[None, None, :], ys[None, :, None], zs[:, None, None]


def soft_weight(depth: np.ndarray, edge: float) -> np.ndarray:
    """Partial-volume weight in [0, 1] from a signed depth (mm, positive inside) and edge width."""
    return np.clip(depth / edge + 0.5, 0.0, 1.0)


def paint_capsule(
    vol: np.ndarray,
    grid: Grid,
    p0: np.ndarray,
    p1: np.ndarray,
    r0: float,
    value: float,
    *,
    r1: float | None = None,
    where: np.ndarray | None = None,
) -> None:
    """Paint a (tapered) capsule from p0 (radius r0) to p1 (radius r1) with `value` HU, in place.

    `where` is an optional boolean volume (same shape as `vol`) restricting the painted voxels.
    """
    p0 = np.asarray(p0, dtype=np.float32)
    p1 = np.asarray(p1, dtype=np.float32)
    r1 = r0 if r1 is None else r1
    rmax = max(r0, r1) + grid.edge
    box = grid.box(np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax)
    if box is None:
        return
    x, y, z = grid.coords(box)
    d = p1 - p0
    length2 = float(d @ d)
    rx, ry, rz = x - p0[0], y - p0[1], z - p0[2]
    if length2 > 1e-6:
        t = np.clip((rx * d[0] + ry * d[1] + rz * d[2]) / length2, 0.0, 1.0)
        dist = np.sqrt((rx - t * d[0]) ** 2 + (ry - t * d[1]) ** 2 + (rz - t * d[2]) ** 2)
        radius = r0 + (r1 - r0) * t
    else:
        dist = np.sqrt(rx * rx + ry * ry + rz * rz)
        radius = r0
    w = soft_weight(radius - dist, grid.edge)
    if where is not None:
        w = w * where[box]
    sub = vol[box]
    sub += w * (value - sub)


def local_box(
    grid: Grid, centre: np.ndarray, up: np.ndarray, lo: tuple[float, float, float], hi: tuple[float, float, float]
) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
    """Local (lateral a, posterior p, superior h) coordinates for a box given in a tilted frame.

    The frame is centred at `centre` (x, y, z) with superior axis `up` in the sagittal (y, z) plane;
    a = patient x, p is perpendicular to `up` and points posterior. `lo`/`hi` bound (a, p, h).
    Returns the unclipped index box and the local coordinate arrays over it (None if off-grid).
    """
    uy, uz = float(up[1]), float(up[2])
    n = np.hypot(uy, uz)
    uy, uz = uy / n, uz / n
    corners = []
    for a in (lo[0], hi[0]):
        for p in (lo[1], hi[1]):
            for h in (lo[2], hi[2]):
                corners.append((centre[0] + a, centre[1] + p * uz + h * uy, centre[2] - p * uy + h * uz))
    c = np.asarray(corners, dtype=np.float32)
    if grid.box(c.min(0), c.max(0)) is None:
        return None
    box = grid.box(c.min(0), c.max(0), clip=False)
    assert box is not None
    x, y, z = grid.coords(box)
    rx, ry, rz = x - centre[0], y - centre[1], z - centre[2]
    a_ = np.broadcast_to(rx, (box[0].stop - box[0].start, box[1].stop - box[1].start, rx.shape[2]))
    p_ = ry * uz - rz * uy
    h_ = ry * uy + rz * uz
    return box, a_, p_, h_


def clip_box(grid: Grid, box: tuple[slice, slice, slice]) -> tuple[tuple[slice, slice, slice], tuple[slice, ...]]:
    """Clip an unclipped index box to the grid: (grid slices, matching slices into the box arrays)."""
    g, local = [], []
    for i, s in enumerate(box):
        a, b = max(s.start, 0), min(s.stop, grid.shape[i])
        b = max(a, b)
        g.append(slice(a, b))
        local.append(slice(a - s.start, b - s.start))
    return (g[0], g[1], g[2]), tuple(local)


def noisy_int16(vol: np.ndarray, rng: np.random.Generator, sigma: float, smooth: bool = True) -> np.ndarray:
    """Add Gaussian noise (std `sigma` HU) and round/clip to int16 (-1024..3071); `vol` is overwritten.

    `smooth` correlates neighbouring pixels in-plane (a 2x2 box over white noise, rescaled), giving the
    fine, slightly correlated texture of filtered back-projection at little cost. Works per slab.
    """
    out = np.empty(vol.shape, dtype=np.int16)
    for k0 in range(0, vol.shape[0], 8):
        sl = vol[k0 : k0 + 8]
        n = rng.standard_normal(sl.shape, dtype=np.float32)
        if smooth:
            m = n.copy()
            m[:, :-1, :] += n[:, 1:, :]
            m[:, :, :-1] += n[:, :, 1:]
            m[:, :-1, :-1] += n[:, 1:, 1:]
            n = m
            sigma_eff = np.float32(sigma * 0.5)  # the sum of 4 unit normals has std 2
        else:
            sigma_eff = np.float32(sigma)
        n *= sigma_eff
        sl += n
        np.rint(sl, out=sl)
        np.clip(sl, -1024, 3071, out=sl)
        out[k0 : k0 + 8] = sl
    return out


def _turn(rng: np.random.Generator, d: np.ndarray, angle: float) -> np.ndarray:
    """Rotate unit vector `d` by `angle` radians towards a random perpendicular direction."""
    v = rng.standard_normal(3)
    perp = v - (v @ d) * d
    perp /= np.linalg.norm(perp) + 1e-9
    out = np.cos(angle) * d + np.sin(angle) * perp
    return out / np.linalg.norm(out)


def grow_tree(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    radius: float,
    inside,  # noqa: ANN001 - callable (N, 3) points -> bool (N,)
    *,
    min_radius: float,
    budget: int,
) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """Grow a branching tube tree (vessels, airways); returns segments (p0, p1, r0, r1).

    Each segment is ~6-10 radii long and slightly curved; it forks into a major (0.8-0.9 r, small
    angle) and a minor (0.55-0.7 r, wide angle) branch, like Murray's-law vascular trees, so the
    tubes stay elongated over many voxels. A branch stops when it would leave `inside`, gets thinner
    than `min_radius`, or the segment budget is spent (largest branches are grown first).
    """
    segments: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    d0 = np.asarray(direction, float) / np.linalg.norm(direction)
    start = np.asarray(start, float)
    path = start[None, :] + np.arange(0.0, 80.0, 1.0)[:, None] * d0[None, :]
    ok = inside(path)
    if not ok.any():
        return segments
    first = path[int(np.argmax(ok))]
    if np.linalg.norm(first - start) > 0.5:  # the trunk runs (unseen) from the hilum to the lung
        segments.append((start, first, radius, radius))
    heap = [(-radius, 0, first, d0)]
    counter = 1
    while heap and len(segments) < budget:
        heap.sort(key=lambda t: (t[0], t[1]))
        neg_r, _, pos, d = heap.pop(0)
        r = -neg_r
        length = float(np.clip(r * rng.uniform(5.0, 8.0), 3.0, 25.0))
        for _ in range(4):
            d_new = _turn(rng, d, rng.uniform(0.0, 0.25))
            end = pos + length * d_new
            mid = pos + 0.5 * length * d_new + rng.normal(0.0, 0.08 * length, 3)
            pts = np.stack([mid, end])
            if inside(pts).all():
                break
        else:
            continue
        r_end = r * 0.93
        segments += [(pos, mid, r, (r + r_end) / 2), (mid, end, (r + r_end) / 2, r_end)]
        for ratio, lo, hi in ((rng.uniform(0.82, 0.9), 0.15, 0.45), (rng.uniform(0.6, 0.72), 0.5, 1.0)):
            rc = r_end * ratio
            if rc >= min_radius:
                heap.append((-rc, counter, end, _turn(rng, d_new, rng.uniform(lo, hi))))
                counter += 1
    return segments
