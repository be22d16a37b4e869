"""Caps on what one series may make inference allocate, checked before the allocation they bound.

`VolumeLimits` is carried by the runner (`inference.composition.build_runner(..., limits=...)`); the gateway fills
it from its `limits:` settings. Slices and voxels are checked from the headers before any pixel is decoded; the
model grid (the volume resampled to a model's spacing) before resampling.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference.errors import VolumeError


@dataclass(frozen=True)
class VolumeLimits:
    """Slices and voxels of one series' volume, and voxels of that volume on a model's grid."""

    max_slices: int = 3000
    max_voxels: int = 600_000_000
    max_model_grid_voxels: int = 400_000_000

    def __post_init__(self) -> None:
        if self.max_slices < 2 or self.max_voxels < 1 or self.max_model_grid_voxels < 1:
            raise ValueError(f"volume limits must be positive (at least 2 slices): {self}")

    def check_slices(self, n_slices: int) -> None:
        """Refuse a series of more than `max_slices` instances (before any header is read)."""
        if n_slices > self.max_slices:
            raise VolumeError(f"series too large: {n_slices} slices, more than the limit of {self.max_slices} "
                              "(limits.max_slices)")

    def check_voxels(self, n_slices: int, rows: int, columns: int) -> None:
        """Refuse a volume of more than `max_voxels` voxels, from Rows x Columns x slices (before decoding)."""
        voxels = n_slices * rows * columns
        if voxels > self.max_voxels:
            raise VolumeError(f"series too large: {n_slices} slices of {rows}x{columns} are {voxels:,} voxels, more "
                              f"than the limit of {self.max_voxels:,} (limits.max_voxels)")


DEFAULT_LIMITS = VolumeLimits()
