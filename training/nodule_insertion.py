"""Nodule insertion: paint extra synthetic nodules into lung patches during training.

A training set of a few dozen chest CTs holds only ~80 nodules, too few for the network to generalise
over size, kind and surroundings. `RandInsertNoduled` paints a fresh nodule (the generator's own
`paint_nodule`: lobulated solid, part-solid or ground-glass, 3-30 mm) into lung parenchyma of a patch on
the model grid and labels it, with noise matched to the patch so the nodule is not smoother than the
lung around it. The held-out set is never touched (it is generated, not augmented).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from scipy import ndimage

from training.synthetic.chest_ct import NODULE_KINDS, Nodule, paint_nodule, sample_diameter_mm
from training.synthetic.phantom import Grid

LUNG_HU = (-950.0, -500.0)       # parenchyma (vessels and walls excluded) where a centre may lie
DENSE_HU = -400.0                # vessel, airway wall, pleura: denser than any ground glass
KIND_WEIGHTS = (0.6, 0.2, 0.2)   # solid, part-solid, ground-glass (as the generator draws them)
_PROBES = 40


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _like(new: np.ndarray, old: Any) -> Any:
    if isinstance(old, torch.Tensor):
        out = old.clone()
        out[...] = torch.as_tensor(new, dtype=old.dtype)
        return out
    return new.astype(np.asarray(old).dtype, copy=False)


def patch_noise_hu(hu: np.ndarray, lung: np.ndarray) -> float:
    """Noise standard deviation (HU) of the lung in a patch: robust spread of the residual after a 3^3 mean."""
    if lung.sum() < 50:
        return 0.0
    residual = (hu - ndimage.uniform_filter(hu, size=3))[lung]
    return float(1.4826 * np.median(np.abs(residual - np.median(residual))) * np.sqrt(27.0 / 26.0))


class RandInsertNoduled(Randomizable, MapTransform):
    """With probability `prob`, paint one synthetic nodule into lung parenchyma of a [1, Z, Y, X] patch.

    `image` is windowed HU in [0, 1] (`window`), on a grid of `spacing_mm` (z, y, x); `label` gets 1 where
    the nodule is. The centre is a parenchyma voxel whose surrounding sphere (radius + 1.5 mm) lies mostly
    (>= 70 % of probes) in lung, so nodules may touch vessels or the pleura, as real ones do.

    The nodules the generator's distribution makes hardest can be drawn more often: `small_fraction` of
    the diameters uniformly in 3..`small_max_mm`, `kind_weights` for solid / part-solid / ground glass, and
    `juxtapleural_fraction` of the nodules centred 0.5-1 radius inside the lung's edge (at least 30 % of
    the probes in lung), as the generator's juxtapleural nodules are; `vessel_fraction` of the others
    centred 0.6 radius to radius + 1 mm from dense tissue (> -400 HU: a vessel, an airway wall, the
    pleura), so they abut it, as the small nodules a 1.5 mm model misses do. With `centre_within_mm`, centres lie
    within that distance of the patch's centre voxel (a classifier patch: the nodule is what the patch is about).
    """

    def __init__(self, keys: KeysCollection, window: Sequence[float], spacing_mm: Sequence[float],
                 prob: float = 0.5, max_diameter_mm: float = 30.0, small_fraction: float = 0.0,
                 small_max_mm: float = 8.0, juxtapleural_fraction: float = 0.0,
                 kind_weights: Sequence[float] = KIND_WEIGHTS, vessel_fraction: float = 0.0,
                 centre_within_mm: float | None = None) -> None:
        MapTransform.__init__(self, keys)
        self.low, self.high = float(window[0]), float(window[1])
        self.spacing = tuple(float(s) for s in spacing_mm)
        self.prob = float(prob)
        self.max_diameter_mm = float(max_diameter_mm)
        self.small_fraction = float(small_fraction)
        self.small_max_mm = float(small_max_mm)
        self.juxtapleural_fraction = float(juxtapleural_fraction)
        self.vessel_fraction = float(vessel_fraction)
        self.centre_within_mm = None if centre_within_mm is None else float(centre_within_mm)
        self._regions: dict[tuple[int, ...], np.ndarray] = {}   # by patch shape: the same every call in training
        w = np.asarray(kind_weights, dtype=float)
        if w.shape != (len(NODULE_KINDS),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"kind_weights needs {len(NODULE_KINDS)} non-negative weights, got {kind_weights}")
        self.kind_weights = w / w.sum()
        dirs = np.random.default_rng(0).standard_normal((_PROBES, 3))
        self._dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)

    def randomize(self, data: Any = None) -> None:
        self._do = self.R.uniform() < self.prob

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do:
            return d
        image, label = _as_numpy(d["image"])[0], _as_numpy(d["label"])[0]
        hu = self.low + image.astype(np.float32) * (self.high - self.low)
        lung = (hu > LUNG_HU[0]) & (hu < LUNG_HU[1]) & (label == 0)
        painted = self._insert(hu, label.copy(), lung)
        if painted is None:
            return d
        hu, new_label = painted
        d["image"] = _like(np.clip((hu - self.low) / (self.high - self.low), 0.0, 1.0)[None], d["image"])
        d["label"] = _like(new_label[None], d["label"])
        return d

    def _diameter(self) -> float:
        if self.R.uniform() < self.small_fraction:
            return float(self.R.uniform(3.0, self.small_max_mm))
        return sample_diameter_mm(self.R)

    def _centre_region(self, shape: tuple[int, ...]) -> np.ndarray | bool:
        """Where a centre may lie: everywhere, or within `centre_within_mm` of the patch's centre voxel (index
        size // 2, as `inference.candidates.patches` centres its cubes)."""
        if self.centre_within_mm is None:
            return True
        if shape not in self._regions:
            grid = np.indices(shape, dtype=np.float32)
            d2 = sum(((g - n // 2) * s) ** 2 for g, n, s in zip(grid, shape, self.spacing, strict=True))
            self._regions[shape] = d2 <= self.centre_within_mm ** 2
        return self._regions[shape]

    def _insert(self, hu: np.ndarray, label: np.ndarray, lung: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        allowed = lung & self._centre_region(hu.shape)
        candidates = np.argwhere(allowed)
        if len(candidates) == 0:
            return None
        sp = np.asarray(self.spacing)
        extent = (np.asarray(hu.shape) - 1) * sp
        soft = ndimage.uniform_filter((hu < LUNG_HU[1]).astype(np.float32), size=3) > 0.5
        pleural = self.R.uniform() < self.juxtapleural_fraction
        vessel = not pleural and self.R.uniform() < self.vessel_fraction
        depth = ndimage.distance_transform_edt(soft, sampling=sp) if pleural else None
        to_dense = ndimage.distance_transform_edt(hu <= DENSE_HU, sampling=sp) if vessel else None
        for _ in range(20):
            r = min(self._diameter(), self.max_diameter_mm, 0.5 * float(extent.min())) / 2
            if depth is not None:  # centres 0.5-1 radius inside the lung's edge
                near = np.argwhere(allowed & (depth > 0.5 * r) & (depth < r))
            elif to_dense is not None:  # abutting a vessel or wall
                near = np.argwhere(allowed & (to_dense > 0.6 * r) & (to_dense < r + 1.0))
            else:
                near = candidates
            if len(near) == 0:
                continue
            centre = near[self.R.randint(len(near))]
            probes = np.round((centre * sp + self._dirs * (r + 1.5)) / sp).astype(int)
            inside = np.all((probes >= 0) & (probes < np.asarray(hu.shape)), axis=1)
            need = 0.3 if depth is not None else 0.5 if to_dense is not None else 0.7
            if inside.sum() < 0.7 * _PROBES or soft[tuple(probes[inside].T)].sum() < need * _PROBES:
                continue
            kind = str(self.R.choice(NODULE_KINDS, p=self.kind_weights))
            # grid (x, y, z) mm with the patch's voxel [0, 0, 0] at the origin
            grid = Grid(tuple(int(s) for s in hu.shape), self.spacing, (0.0, 0.0, 0.0))  # type: ignore[arg-type]
            nodule = Nodule((float(centre[2] * sp[2]), float(centre[1] * sp[1]), float(centre[0] * sp[0])),
                            2 * r, kind, depth is not None)
            before = hu.copy()
            rng = np.random.default_rng(int(self.R.randint(2**31)))
            paint_nodule(hu, label, grid, nodule, rng)
            changed = hu != before
            sigma = patch_noise_hu(before, lung)
            if sigma > 0 and changed.any():
                hu[changed] += rng.normal(0.0, sigma, int(changed.sum())).astype(np.float32)
            return hu, label
        return None
