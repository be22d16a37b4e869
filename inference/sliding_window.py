"""Patch-wise inference over a volume larger than the network's patch, with blended overlaps (numpy).

Patches of `roi_size` are laid on a regular grid (step = roi * (1 - overlap), the last patch flush with
the far edge), run through the backend in batches, weighted by an importance map (gaussian: centre
voxels count more than patch borders, which see less context; or constant) and averaged.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np

from inference.backends.base import Backend
from inference.errors import BackendError

_MIN_WEIGHT = 1e-3


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices of patches along one axis; covers [0, size) with the last patch ending at size."""
    if size <= roi:
        return [0]
    step = max(1, int(roi * (1.0 - overlap)))
    starts = list(range(0, size - roi, step))
    starts.append(size - roi)
    return sorted(set(starts))


def importance_map(roi_size: Sequence[int], mode: Literal["gaussian", "constant"] = "gaussian",
                   sigma_scale: float = 0.125) -> np.ndarray:
    """float32 weights [rz, ry, rx] with maximum 1 (gaussian) or all ones (constant)."""
    if mode == "constant":
        return np.ones(tuple(roi_size), dtype=np.float32)
    if mode != "gaussian":
        raise ValueError(f"unknown blend mode {mode!r}")
    axes = []
    for r in roi_size:
        x = np.arange(r, dtype=np.float64) - (r - 1) / 2.0
        sigma = max(sigma_scale * r, 1e-6)
        axes.append(np.exp(-0.5 * (x / sigma) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w /= w.max()
    return np.maximum(w, _MIN_WEIGHT).astype(np.float32)


def _windows(shape: Sequence[int], roi: Sequence[int], overlap: float) -> Iterator[tuple[slice, slice, slice]]:
    per_axis = [window_starts(n, r, overlap) for n, r in zip(shape, roi, strict=True)]
    for z, y, x in itertools.product(*per_axis):
        yield (slice(z, z + roi[0]), slice(y, y + roi[1]), slice(x, x + roi[2]))


def _pad_to_roi(image: np.ndarray, roi: Sequence[int]) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Pad (zeros, symmetric) where the image is smaller than the patch; return the crop back."""
    pads = [(max(r - n, 0) // 2, max(r - n, 0) - max(r - n, 0) // 2) for n, r in zip(image.shape, roi, strict=True)]
    crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, image.shape, strict=True))
    if not any(lo or hi for lo, hi in pads):
        return image, crop  # type: ignore[return-value]
    return np.pad(image, pads, mode="constant", constant_values=0.0), crop  # type: ignore[return-value]


def sliding_window_infer(
    image_zyx: np.ndarray,
    backend: Backend,
    input_name: str,
    output_name: str,
    roi_size: Sequence[int],
    overlap: float,
    batch_size: int,
    out_channels: int,
    mode: Literal["gaussian", "constant"] = "gaussian",
    sigma_scale: float = 0.125,
) -> np.ndarray:
    """Run `backend` over `image_zyx` ([Z, Y, X] float32) patch by patch; returns float32 [C, Z, Y, X].

    The backend gets `{input_name: [B, 1, rz, ry, rx]}` and must return `{output_name: [B, C, rz, ry, rx]}`.
    """
    if image_zyx.ndim != 3:
        raise ValueError(f"expected a [Z, Y, X] image, got shape {image_zyx.shape}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    roi = tuple(int(r) for r in roi_size)
    image, crop = _pad_to_roi(np.asarray(image_zyx, dtype=np.float32), roi)
    weights = importance_map(roi, mode, sigma_scale)
    acc = np.zeros((out_channels, *image.shape), dtype=np.float32)
    norm = np.zeros(image.shape, dtype=np.float32)
    batch = np.empty((max(1, batch_size), 1, *roi), dtype=np.float32)

    windows = list(_windows(image.shape, roi, overlap))
    for first in range(0, len(windows), batch.shape[0]):
        chunk = windows[first:first + batch.shape[0]]
        for j, sl in enumerate(chunk):
            batch[j, 0] = image[sl]
        pred = _run(backend, input_name, output_name, batch[:len(chunk)], out_channels)
        pred *= weights
        for j, sl in enumerate(chunk):
            acc[(slice(None), *sl)] += pred[j]
            norm[sl] += weights
    acc /= norm
    if acc.shape[1:] == tuple(image_zyx.shape):
        return acc
    return np.ascontiguousarray(acc[(slice(None), *crop)])


def _run(backend: Backend, input_name: str, output_name: str, batch: np.ndarray, out_channels: int) -> np.ndarray:
    outputs = backend.infer({input_name: batch})
    if output_name not in outputs:
        raise BackendError(f"backend {backend.name!r} returned {sorted(outputs)}, not {output_name!r}")
    pred = np.asarray(outputs[output_name], dtype=np.float32)
    expected = (batch.shape[0], out_channels, *batch.shape[2:])
    if pred.shape != expected:
        raise BackendError(f"backend {backend.name!r} output {output_name!r} has shape {pred.shape}, "
                           f"expected {expected}")
    if not pred.flags.writeable:
        pred = pred.copy()
    return pred
