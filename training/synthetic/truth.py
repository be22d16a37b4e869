"""Ground truth of a generated CT: the volume with its nodules or vertebrae (axes and coordinates as in
`training.synthetic.phantom`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Nodule", "SyntheticVolume", "Vertebra"]


@dataclass(frozen=True)
class Nodule:
    """Ground truth of one nodule: centre (x, y, z) in LPS mm, diameter mm, kind, juxtapleural flag."""

    centre_mm: tuple[float, float, float]
    diameter_mm: float
    kind: str
    juxtapleural: bool


@dataclass(frozen=True)
class Vertebra:
    """One vertebra: label "C1".."L5" or "S1" (sacrum), VerSe index, centroid of its voxels (LPS mm)."""

    label: str
    index: int
    centroid_mm: tuple[float, float, float]


@dataclass
class SyntheticVolume:
    """A generated CT volume with its ground truth."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    label_map: np.ndarray
    nodules: list[Nodule] = field(default_factory=list)
    vertebrae: list[Vertebra] = field(default_factory=list)
    body_part: str = "CHEST"

    def voxel_to_patient(self, k: float, r: float, c: float) -> tuple[float, float, float]:
        """Patient (x, y, z) mm of voxel index (k, r, c)."""
        sz, sy, sx = self.spacing
        ox, oy, oz = self.origin
        return (ox + c * sx, oy + r * sy, oz + k * sz)

    def patient_to_voxel(self, x: float, y: float, z: float) -> tuple[float, float, float]:
        """Fractional voxel index (k, r, c) of patient point (x, y, z) mm."""
        sz, sy, sx = self.spacing
        ox, oy, oz = self.origin
        return ((z - oz) / sz, (y - oy) / sy, (x - ox) / sx)
