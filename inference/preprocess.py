"""Array transforms between the source grid and the model grid (numpy + scipy.ndimage only).

The model grid keeps the source's axes and its voxel [0, 0, 0] centre (no reorientation, see the Model
contract in docs/design.md) and changes only the spacing to `card.input.spacing_mm`: model voxel i along
an axis sits at source index i * target / source. `to_source_grid` is the inverse (the `Invertd` step):
predictions go back to the source grid before findings are measured and encoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.errors import InferenceError
from inference.limits import DEFAULT_LIMITS, VolumeLimits
from inference.model_card import ModelCard
from inference.volume import Volume

_SAME_SPACING_RTOL = 1e-3


class PreprocessError(InferenceError):
    """The volume cannot be brought onto the model grid."""

    stage = "preprocess"


@dataclass(frozen=True)
class ResampleInfo:
    """What `to_source_grid` needs to undo `preprocess`."""

    source_shape: tuple[int, int, int]
    source_spacing: tuple[float, float, float]   # (z, y, x) mm
    target_spacing: tuple[float, float, float]   # (z, y, x) mm
    model_shape: tuple[int, int, int]

    @classmethod
    def of(cls, volume: Volume, target_spacing: Sequence[float], model_shape: Sequence[int]) -> ResampleInfo:
        """The mapping between `volume`'s grid and a model grid of `target_spacing` and `model_shape`."""
        return cls(source_shape=volume.shape,
                   source_spacing=tuple(float(s) for s in volume.spacing),  # type: ignore[arg-type]
                   target_spacing=tuple(float(s) for s in target_spacing),  # type: ignore[arg-type]
                   model_shape=tuple(int(s) for s in model_shape))  # type: ignore[arg-type]

    @property
    def identity(self) -> bool:
        return self.source_shape == self.model_shape and np.allclose(
            self.source_spacing, self.target_spacing, rtol=_SAME_SPACING_RTOL
        )


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
                    ) -> tuple[int, int, int]:
    """Number of target voxels covering the same extent: round(n * spacing / target), at least 1."""
    return tuple(  # type: ignore[return-value]
        max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing, strict=True)
    )


LINEAR_SLAB = 8    # output slices interpolated at a time by `_linear_map`: its temporaries stay ~20 MiB for 512 x 512


def _linear_axis(n_out: int, scale: float, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For out[i] = src[i * scale] along one axis: the source neighbours below and above each position and the
    weight of the one above (float32), positions clamped to the source's extent (scipy's mode 'nearest')."""
    x = np.clip(np.arange(n_out, dtype=np.float64) * scale, 0.0, n_in - 1)
    lo = np.floor(x).astype(np.intp)
    return lo, np.minimum(lo + 1, n_in - 1), (x - lo).astype(np.float32)


def _lerp(src: np.ndarray, axis: int, lo: np.ndarray, hi: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Linear interpolation of `src` along `axis` between its slices `lo` and `hi` (float32)."""
    shape = [1] * src.ndim
    shape[axis] = -1
    a = np.take(src, lo, axis=axis).astype(np.float32, copy=False)
    b = np.take(src, hi, axis=axis).astype(np.float32, copy=False)
    b -= a
    b *= w.reshape(shape)
    a += b
    return a


def _linear_map(src: np.ndarray, scale: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    """Trilinear out[i] = src[i * scale], edges clamped, as three one-axis interpolations over `LINEAR_SLAB`
    output slices at a time (slices first where there are fewer out than in, else last): the values of
    `ndimage.affine_transform(order=1, mode='nearest')` to float32 rounding, 2-5 times faster on a chest CT, with
    temporaries of a slab's size only."""
    (lz, hz, wz), (ly, hy, wy), (lx, hx, wx) = (
        _linear_axis(n, float(s), m) for n, s, m in zip(out_shape, scale, src.shape, strict=True))
    slices_first = out_shape[0] <= src.shape[0]
    out = np.empty(out_shape, dtype=np.float32)
    for k0 in range(0, out_shape[0], LINEAR_SLAB):
        k1 = min(k0 + LINEAR_SLAB, out_shape[0])
        first = int(lz[k0])
        part = src[first:int(hz[k1 - 1]) + 1]
        if slices_first:
            part = _lerp(part, 0, lz[k0:k1] - first, hz[k0:k1] - first, wz[k0:k1])
        part = _lerp(_lerp(part, 2, lx, hx, wx), 1, ly, hy, wy)
        out[k0:k1] = part if slices_first else _lerp(part, 0, lz[k0:k1] - first, hz[k0:k1] - first, wz[k0:k1])
    return out


def _grid_map(src: np.ndarray, scale: np.ndarray, out_shape: tuple[int, ...], order: int) -> np.ndarray:
    """out[i] = src[i * scale] (per axis), interpolated with spline `order`, edges clamped."""
    if src.dtype == np.bool_:
        return _grid_map(src.view(np.uint8), scale, out_shape, 0).astype(np.bool_)
    if order == 1:
        return _linear_map(src, scale, out_shape)
    out = np.empty(out_shape, dtype=np.float32 if order > 0 else src.dtype)
    ndimage.affine_transform(src, scale, offset=0.0, output_shape=out_shape, output=out,
                             order=order, mode="nearest", prefilter=order > 1)
    return out


def resample(volume_zyx: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float],
             order: int = 1) -> np.ndarray:
    """Resample a [Z, Y, X] array from `spacing` to `target_spacing` (mm); returns float32.

    Voxel [0, 0, 0] keeps its centre; the output covers the same extent (see `resampled_shape`).
    """
    if volume_zyx.ndim != 3:
        raise PreprocessError(f"expected a [Z, Y, X] array, got shape {volume_zyx.shape}")
    if any(float(t) <= 0 for t in target_spacing) or any(float(s) <= 0 for s in spacing):
        raise PreprocessError(f"spacings must be positive: {tuple(spacing)} -> {tuple(target_spacing)}")
    out_shape = resampled_shape(volume_zyx.shape, spacing, target_spacing)
    if out_shape == volume_zyx.shape and np.allclose(spacing, target_spacing, rtol=_SAME_SPACING_RTOL):
        return volume_zyx.astype(np.float32)   # always a new array
    scale = np.asarray(target_spacing, dtype=np.float64) / np.asarray(spacing, dtype=np.float64)
    # int16 / float32 sources are read in place (no float copy of the whole study); output float32
    src = volume_zyx if volume_zyx.dtype in (np.int16, np.float32) else volume_zyx.astype(np.float32)
    out = _grid_map(src, scale, out_shape, order)
    return out if out.dtype == np.float32 else out.astype(np.float32)


def window(arr: np.ndarray, low: float, high: float, out: np.ndarray | None = None) -> np.ndarray:
    """Map [low, high] linearly to [0, 1] and clip, as float32 (into `out` if given, e.g. `out=arr`)."""
    if not high > low:
        raise PreprocessError(f"window high ({high}) must exceed low ({low})")
    if out is None:
        out = np.array(arr, dtype=np.float32)
    elif out is not arr:
        out[...] = arr
    out -= np.float32(low)
    out *= np.float32(1.0 / (high - low))
    np.clip(out, 0.0, 1.0, out=out)
    return out


def model_grid_shape(volume: Volume, card: ModelCard, limits: VolumeLimits = DEFAULT_LIMITS) -> tuple[int, int, int]:
    """The shape of `volume` on `card`'s grid; refuses one beyond `limits.max_model_grid_voxels` before anything
    is resampled (fine model spacings turn a large volume into many more voxels)."""
    shape = resampled_shape(volume.shape, volume.spacing, card.input.spacing_mm)
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > limits.max_model_grid_voxels:
        raise PreprocessError(
            f"model grid too large: the volume at {tuple(card.input.spacing_mm)} mm is {shape[0]}x{shape[1]}x"
            f"{shape[2]} = {voxels:,} voxels, more than the limit of {limits.max_model_grid_voxels:,} "
            "(limits.max_model_grid_voxels)")
    return shape


def preprocess(volume: Volume, card: ModelCard, limits: VolumeLimits = DEFAULT_LIMITS
               ) -> tuple[np.ndarray, ResampleInfo]:
    """Volume -> model input [Z, Y, X] float32 in [0, 1] on the card's grid, plus the inverse mapping.

    The model grid is checked against `limits` first (`model_grid_shape`)."""
    model_grid_shape(volume, card, limits)
    target = tuple(float(s) for s in card.input.spacing_mm)
    image = resample(volume.voxels, volume.spacing, target, order=1)   # a new array: windowing in place is safe
    window(image, *card.input.window, out=image)
    return image, ResampleInfo.of(volume, target, image.shape)


def to_source_grid(label_or_prob_map: np.ndarray, info: ResampleInfo,
                   source_shape: Sequence[int] | None = None, order: int = 0) -> np.ndarray:
    """Map a model-grid array [Z, Y, X] or [C, Z, Y, X] back onto the source grid.

    order 0 (nearest) keeps label values and dtype; order 1 interpolates probabilities (float32).
    """
    shape = tuple(int(s) for s in (source_shape if source_shape is not None else info.source_shape))
    arr = label_or_prob_map
    if arr.shape[-3:] != info.model_shape:
        raise PreprocessError(f"array shape {arr.shape} does not end in the model grid {info.model_shape}")
    if info.identity and shape == info.model_shape:
        return arr if order == 0 else arr.astype(np.float32, copy=False)
    scale = np.asarray(info.source_spacing) / np.asarray(info.target_spacing)
    if arr.ndim == 3:
        return _grid_map(arr, scale, shape, order)
    if arr.ndim == 4:
        return np.stack([_grid_map(c, scale, shape, order) for c in arr])
    raise PreprocessError(f"expected [Z, Y, X] or [C, Z, Y, X], got shape {arr.shape}")
