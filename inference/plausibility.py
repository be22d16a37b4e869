"""Values a series must have to be measured: finite, physically sensible geometry and rescale, CT-like HU.

A NaN in ImagePositionPatient sorts slices at random, a RescaleSlope of 0 makes every voxel the intercept, 50 mm
pixels put a nodule's diameter off by a factor of a hundred: each fails the job at load with the attribute named
(values are never quoted; they may be anything a sender wrote).

HU plausibility (`check_ct_values`): a CT of the body always holds some fat (about -100 HU), lung or air (-1000 HU),
if only around the patient. A volume whose 1st percentile is above `CT_LOW_HU` (fewer than 1% of voxels at or
below -50 HU) is not a CT in Hounsfield units, e.g. MR pixels (0 and up) labelled CT, or a CT whose rescale was
lost; a CT model refuses it rather than report findings on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from pydicom.dataset import Dataset

from inference.errors import VolumeError

MAX_PIXEL_SPACING_MM = 10.0     # a 512-pixel row would span 5 m
MAX_SLICE_SPACING_MM = 50.0     # no volume: two slices 5 cm apart
CT_LOW_HU = -50.0               # fat, lung and air are at or below this
CT_LOW_PERCENTILE = 1.0         # ... in at least this percentage of a CT's voxels
_SAMPLE_SLICES = 64             # HU statistics from at most this many slices, every 4th row and column


class ImplausibleCTError(VolumeError):
    """The pixel values of a series labelled CT are not Hounsfield units of a body."""


def check_finite(values: Iterable[float], keyword: str, name: str) -> None:
    """Refuse NaN or infinity in `keyword` of file `name`."""
    if not all(math.isfinite(v) for v in values):
        raise VolumeError(f"{name}: {keyword} is not finite (NaN or infinity)")


def check_pixel_spacing(row_col_mm: tuple[float, float], name: str) -> None:
    """PixelSpacing (PS3.3 C.7.6.2.1.1) must lie in (0, MAX_PIXEL_SPACING_MM] mm."""
    if not all(0.0 < v <= MAX_PIXEL_SPACING_MM for v in row_col_mm):
        raise VolumeError(f"{name}: PixelSpacing {row_col_mm[0]:g}/{row_col_mm[1]:g} mm is not a plausible pixel "
                          f"size (0 to {MAX_PIXEL_SPACING_MM:g} mm)")


def check_slice_spacing(spacing_mm: float) -> None:
    """The spacing between sorted slices (from ImagePositionPatient) must not exceed MAX_SLICE_SPACING_MM."""
    if not spacing_mm <= MAX_SLICE_SPACING_MM:
        raise VolumeError(f"slice spacing {spacing_mm:g} mm is not a plausible volume (at most "
                          f"{MAX_SLICE_SPACING_MM:g} mm between slices)")


def _number(ds: Dataset, keyword: str, default: float, name: str) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise VolumeError(f"{name}: {keyword} is not a number") from None
    check_finite([number], keyword, name)
    return number


def rescale(ds: Dataset, name: str) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of one slice (PS3.3 C.11.1.1.2), defaults 1 and 0; refuses a value that
    is not a finite number and a slope of 0 (every voxel would be the intercept)."""
    slope = _number(ds, "RescaleSlope", 1.0, name)
    intercept = _number(ds, "RescaleIntercept", 0.0, name)
    if slope == 0.0:
        raise VolumeError(f"{name}: RescaleSlope is 0; the pixel values cannot be mapped to HU")
    return slope, intercept


def _sample(voxels: np.ndarray) -> np.ndarray:
    step = max(1, math.ceil(voxels.shape[0] / _SAMPLE_SLICES))
    return voxels[::step, ::4, ::4]


def check_ct_values(voxels: np.ndarray) -> None:
    """Refuse a volume labelled CT whose HU histogram is not that of a body (see the module docstring)."""
    sample = np.asarray(_sample(voxels), dtype=np.float32)
    if sample.size == 0:
        return
    low = float(np.percentile(sample, CT_LOW_PERCENTILE))
    if low > CT_LOW_HU:
        air = 100.0 * np.count_nonzero(sample <= -500) / sample.size
        raise ImplausibleCTError(
            f"pixel values are implausible for CT: the {CT_LOW_PERCENTILE:g}st percentile is {low:.0f} HU and "
            f"{air:.1f}% of voxels are at or below -500 HU; a CT of the body has at least {CT_LOW_PERCENTILE:g}% "
            f"fat, lung or air at or below {CT_LOW_HU:g} HU (pixels of another modality labelled CT, or a lost "
            "rescale?)")
