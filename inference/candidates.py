"""Nodule candidates found without a network: blobs of the chest CT on a 1 mm grid (second stage, step 1).

A lung model misses small nodules against a vessel or the pleura with probabilities near 0 at the nodule, so
no threshold of its map recovers them. These candidates do not depend on it:

- `blob_candidates`: maxima of the scale-normalised Laplacian of Gaussian (sigma 1.0-2.8 mm, HU clipped to
  [-1000, 100]) inside the lungs closed by 6 mm, so juxtapleural and vessel-attached nodules stay in;
  about 2000-4000 per 512-row chest CT.
- `wall_candidates`: the same on a copy where everything that is not lung air, and the air rim touching it, is
  set to lung density, kept within 4 mm of the lung's edge: the ground-glass nodules on the pleura whose
  plain LoG response the chest wall's edge cancels (tens to hundreds more per CT).

Each candidate is then scored by `inference.second_stage` on a 24 mm patch of `to_u8` voxels.
Grid convention (as `inference.preprocess.resample`): 1 mm voxel i lies at source voxel i / source spacing.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.preprocess import resample

ISO_MM = 1.0
SIGMAS_MM = (1.0, 1.4, 2.0, 2.8)   # blob radius ~ sigma * sqrt(3): 3.5-10 mm nodules
LOG_FLOOR = 40.0                   # scale-normalised LoG response (HU) a candidate must exceed
WINDOW = (-1000.0, 400.0)          # HU mapped to 0-255 for the patches
PATCH_MM = 24                      # the classifier's patch edge (voxels of 1 mm)


@dataclass(frozen=True)
class Candidates:
    """Blob candidates on the 1 mm grid: indices (z, y, x) [N, 3], LoG responses [N], sigma in mm [N]."""

    index: np.ndarray
    response: np.ndarray
    sigma_mm: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def __add__(self, other: Candidates) -> Candidates:
        return Candidates(np.concatenate([self.index, other.index]), np.concatenate([self.response, other.response]),
                          np.concatenate([self.sigma_mm, other.sigma_mm]))

    @property
    def diameter_mm(self) -> np.ndarray:
        """The blob diameter its best scale stands for (a sphere of radius sigma * sqrt(3))."""
        return 2.0 * np.sqrt(3.0) * self.sigma_mm


def to_iso(hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """HU [Z, Y, X] resampled (linearly) to 1 mm voxels, float32."""
    return resample(hu, spacing, (ISO_MM,) * 3, order=1)


def lung_mask(iso: np.ndarray) -> np.ndarray:
    """The (up to 3) large air regions not touching the in-plane border, closed by a 6 mm ball (on a 2 mm grid)."""
    half = iso[::2, ::2, ::2] < -400
    lab, n = ndimage.label(half)
    border = np.unique(np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(), lab[:, :, 0].ravel(),
                                       lab[:, :, -1].ravel()]))
    sizes = ndimage.sum(half, lab, np.arange(1, n + 1))
    keep = np.zeros(n + 1, dtype=bool)
    for i in np.argsort(-sizes)[:3]:
        if i + 1 not in border and sizes[i] > 20000:
            keep[i + 1] = True
    lung = keep[lab]
    g = np.mgrid[-3:4, -3:4, -3:4]
    ball = (g ** 2).sum(0) <= 9
    closed = ndimage.binary_erosion(ndimage.binary_dilation(lung, ball), ball, border_value=1) | lung
    full = closed.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: iso.shape[0], : iso.shape[1], : iso.shape[2]]
    return np.pad(full, [(0, a - b) for a, b in zip(iso.shape, full.shape, strict=True)])


def _scale_response(img: np.ndarray, sigma_mm: float) -> np.ndarray:
    r = ndimage.gaussian_laplace(img, sigma_mm / ISO_MM, truncate=3.0)
    r *= np.float32(-(sigma_mm / ISO_MM) ** 2)
    return r


def _log_response(img: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The largest scale-normalised LoG response (bright blobs positive) over `SIGMAS_MM`, and its sigma index;
    `threads` scales filtered at a time (scipy's filters release the GIL), merged in scale order either way."""
    best = np.full(img.shape, -np.inf, dtype=np.float32)
    arg = np.zeros(img.shape, dtype=np.uint8)
    step = max(1, threads)
    with ThreadPoolExecutor(step) if step > 1 else nullcontext() as pool:
        scales = pool.map if pool is not None else map
        for k0 in range(0, len(SIGMAS_MM), step):
            group = SIGMAS_MM[k0:k0 + step]
            for k, r in enumerate(scales(_scale_response, [img] * len(group), group), start=k0):
                better = r > best
                best[better] = r[better]
                arg[better] = k
    return best, arg


def _peaks(best: np.ndarray, arg: np.ndarray, floor: float, where: np.ndarray) -> Candidates:
    """Local maxima (3x3x3) of a response above `floor` inside `where`."""
    peaks = np.argwhere((best == ndimage.maximum_filter(best, size=3)) & (best > floor) & where)
    at = tuple(peaks.T)
    return Candidates(peaks, best[at], np.asarray(SIGMAS_MM, dtype=np.float32)[arg[at]])


def blob_candidates(iso: np.ndarray, mask: np.ndarray, floor: float = LOG_FLOOR, threads: int = 1) -> Candidates:
    """Blob candidates of a 1 mm volume inside the lung `mask`."""
    img = np.clip(iso, -1000.0, 100.0)
    return _peaks(*_log_response(img, threads), floor, mask)


def wall_candidates(iso: np.ndarray, mask: np.ndarray, plain: Candidates, near_mm: float = 4.0,
                    floor: float = LOG_FLOOR, apart_mm: float = 2.0, threads: int = 1) -> Candidates:
    """Blob candidates against the chest wall that `blob_candidates` misses.

    Next to the wall the plain LoG response of a faint (ground-glass) nodule is cancelled by the wall edge's
    negative lobe. Here every voxel that is not lung air (denser than -300 HU or outside the mask), and the air
    voxels touching one (the wall's partial-volume rim), are set to -850 HU first; maxima within `near_mm` of the
    mask's edge and more than `apart_mm` from every `plain` candidate are kept."""
    air = ndimage.binary_erosion(mask & (iso < -300.0), border_value=0)
    img = np.where(air, np.clip(iso, -1000.0, 100.0), np.float32(-850.0)).astype(np.float32)
    near = mask & (ndimage.distance_transform_edt(mask) <= near_mm / ISO_MM)
    found = _peaks(*_log_response(img, threads), floor, near)
    if len(plain) and len(found):
        from scipy.spatial import cKDTree

        far = cKDTree(plain.index.astype(float)).query(found.index)[0] > apart_mm / ISO_MM
        found = Candidates(found.index[far], found.response[far], found.sigma_mm[far])
    return found


# Voxels around the lungs' box that the LoG and 3x3x3 maxima inside it read: the widest Gaussian's kernel radius
# (scipy: int(truncate * sigma + 0.5)) plus one. Inside the box the responses equal those of the whole volume.
LUNG_BOX_MARGIN = int(3.0 * max(SIGMAS_MM) / ISO_MM + 0.5) + 1


def lung_box(mask: np.ndarray, margin: int = LUNG_BOX_MARGIN) -> tuple[slice, ...]:
    """The bounding box of `mask` grown by `margin` voxels (clipped to the volume); the whole volume if empty."""
    where = np.argwhere(mask)
    if not len(where):
        return tuple(slice(0, n) for n in mask.shape)
    lo, hi = np.maximum(where.min(0) - margin, 0), np.minimum(where.max(0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def chest_candidates(iso: np.ndarray, threads: int = 1) -> Candidates:
    """Blob plus wall candidates of a 1 mm chest CT, computed on the lungs' box only (the same candidates as on
    the whole volume, in less time), the LoG scales `threads` at a time (the same candidates for any number)."""
    mask = lung_mask(iso)
    box = lung_box(mask)
    sub, sub_mask = iso[box], mask[box]
    plain = blob_candidates(sub, sub_mask, threads=threads)
    found = plain + wall_candidates(sub, sub_mask, plain, threads=threads)
    offset = np.asarray([b.start for b in box], dtype=found.index.dtype)
    return Candidates(found.index + offset, found.response, found.sigma_mm)


def to_u8(iso: np.ndarray) -> np.ndarray:
    """HU -> 0-255 over `WINDOW` (what the patches hold)."""
    lo, hi = WINDOW
    return np.clip((iso - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def patches(u8: np.ndarray, index: np.ndarray, size: int = PATCH_MM) -> np.ndarray:
    """Cubes of edge `size` around each index (voxels index - size // 2 ... + size - 1), zero outside: [N, s, s, s]."""
    h = size // 2
    pad = np.pad(u8, h, mode="constant", constant_values=0)
    out = np.empty((len(index), size, size, size), dtype=np.uint8)
    for i, (z, y, x) in enumerate(np.asarray(index, dtype=int).reshape(-1, 3)):
        out[i] = pad[z:z + size, y:y + size, x:x + size]
    return out
