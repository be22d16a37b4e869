"""Sliding-window inference: coverage, blending arithmetic, padding, and equality with one full pass."""

from __future__ import annotations

import numpy as np
import pytest

from inference.backends.onnxruntime_backend import OnnxRuntimeBackend
from inference.errors import BackendError
from inference.sliding_window import importance_map, sliding_window_infer, window_starts


class AffineVoxelBackend:
    """A real (if trivial) backend: channel c = (c + 1) * x + c, voxel by voxel, so any blend must return it."""

    name = "affine-voxel"

    def __init__(self, channels: int = 2) -> None:
        self.channels = channels
        self.batch_sizes: list[int] = []

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["image"]
        self.batch_sizes.append(x.shape[0])
        return {"logits": np.concatenate([(c + 1) * x + c for c in range(self.channels)], axis=1)}

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("size", "roi", "overlap"), [(10, 16, 0.25), (16, 16, 0.5), (40, 16, 0.25), (33, 8, 0.5)])
def test_window_starts_cover_the_axis(size, roi, overlap):
    starts = window_starts(size, roi, overlap)
    covered = np.zeros(max(size, roi), bool)
    for s in starts:
        covered[s:s + roi] = True
        assert s + roi <= max(size, roi)
    assert covered[:size].all()
    if size > roi:
        assert starts[-1] == size - roi and np.all(np.diff(starts) <= int(roi * (1 - overlap)))


def test_importance_map():
    w = importance_map((8, 8, 8))
    assert w.dtype == np.float32 and w.max() == pytest.approx(1.0) and w.min() > 0
    assert w[4, 4, 4] > w[0, 0, 0]
    assert np.all(importance_map((4, 4, 4), "constant") == 1)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("shape", [(23, 30, 17), (5, 9, 40)])  # larger than roi; smaller in some axes (padded)
def test_blending_reproduces_a_voxelwise_function(mode, shape):
    image = np.random.default_rng(1).random(shape, dtype=np.float32)
    backend = AffineVoxelBackend()
    out = sliding_window_infer(image, backend, "image", "logits", (8, 12, 10), 0.4, 3, 2, mode=mode)
    assert out.shape == (2, *shape) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], image, atol=1e-5)
    np.testing.assert_allclose(out[1], 2 * image + 1, atol=1e-5)
    assert max(backend.batch_sizes) == 3


def test_equals_one_full_pass_when_the_roi_covers_the_volume(nodule_model):
    image = np.random.default_rng(2).random((12, 14, 16), dtype=np.float32)
    with OnnxRuntimeBackend(nodule_model.weights_path, "tiny", intra_op_threads=2) as backend:
        full = backend.infer({"image": image[None, None]})["logits"][0]
        windowed = sliding_window_infer(image, backend, "image", "logits", image.shape, 0.25, 4, 1)
        padded = sliding_window_infer(image, backend, "image", "logits", image.shape, 0.25, 4, 1,
                                      mode="constant")
    np.testing.assert_allclose(windowed, full, atol=1e-5)
    np.testing.assert_allclose(padded, full, atol=1e-5)


def test_overlapping_windows_agree_with_a_full_pass_away_from_patch_borders(nodule_model):
    image = np.random.default_rng(3).random((20, 20, 20), dtype=np.float32)
    with OnnxRuntimeBackend(nodule_model.weights_path, "tiny", intra_op_threads=2) as backend:
        full = backend.infer({"image": image[None, None]})["logits"][0]
        out = sliding_window_infer(image, backend, "image", "logits", (16, 16, 16), 0.25, 2, 1)
    # patches start at 0 and 4; the net sees 2 voxels around each voxel, so [6, 14) never meets a patch face
    inner = (slice(None), *[slice(6, 14)] * 3)
    np.testing.assert_allclose(out[inner], full[inner], atol=1e-5)


def test_wrong_output_shape_is_a_backend_error():
    with pytest.raises(BackendError, match="shape"):
        sliding_window_infer(np.zeros((8, 8, 8), np.float32), AffineVoxelBackend(2), "image", "logits",
                             (8, 8, 8), 0.25, 1, out_channels=3)
    with pytest.raises(BackendError, match="not 'probs'"):
        sliding_window_infer(np.zeros((8, 8, 8), np.float32), AffineVoxelBackend(2), "image", "probs",
                             (8, 8, 8), 0.25, 1, out_channels=2)
