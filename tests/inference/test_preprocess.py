"""Resampling to the model grid, windowing, and the inverse mapping back to the source grid."""

from __future__ import annotations

import numpy as np
import pytest

from inference.model_card import ModelCard
from inference.preprocess import PreprocessError, preprocess, resample, resampled_shape, to_source_grid, window
from inference.volume import load_series


def test_resample_keeps_voxel_zero_and_is_linear_on_a_ramp():
    z, y, x = np.meshgrid(np.arange(10), np.arange(12), np.arange(8), indexing="ij")
    ramp = (2.0 * z + 3.0 * y - x).astype(np.int16)  # values in index units of the source grid
    out = resample(ramp, (2.0, 1.0, 1.5), (1.0, 2.0, 3.0), order=1)
    assert out.dtype == np.float32
    assert out.shape == resampled_shape(ramp.shape, (2.0, 1.0, 1.5), (1.0, 2.0, 3.0)) == (20, 6, 4)
    zz, yy, xx = np.meshgrid(np.arange(20) * 0.5, np.arange(6) * 2.0, np.arange(4) * 2.0, indexing="ij")
    expected = 2.0 * np.minimum(zz, 9) + 3.0 * yy - xx  # clamped beyond the last source slice
    np.testing.assert_allclose(out, expected, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
@pytest.mark.parametrize(("shape", "scale", "out_shape"), [
    ((40, 64, 64), (1.0, 1.43, 1.43), (40, 45, 45)),     # in-plane downsampling (0.7 -> 1 mm)
    ((20, 50, 70), (0.4, 0.7, 1.3), (50, 71, 54)),       # thick slices up, mixed in-plane
    ((33, 17, 9), (2.5, 0.33, 1.0), (14, 52, 9)),        # one axis kept, positions past the last slice
    ((70, 30, 30), (0.5, 2.0, 0.75), (140, 15, 40)),     # many slabs, the last one short
])
def test_linear_resampling_equals_scipys_trilinear_map(dtype, shape, scale, out_shape):
    """The separable, slab-wise linear map gives scipy's affine_transform(order=1, mode='nearest') values."""
    from scipy import ndimage

    from inference.preprocess import _grid_map

    src = np.random.default_rng(sum(shape)).normal(100, 60, shape).clip(0, 255).astype(dtype)
    expected = np.empty(out_shape, dtype=np.float32)
    ndimage.affine_transform(src, np.asarray(scale), offset=0.0, output_shape=out_shape, output=expected, order=1,
                             mode="nearest", prefilter=False)
    out = _grid_map(src, np.asarray(scale), out_shape, order=1)
    assert out.dtype == np.float32 and out.shape == out_shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)


def test_resample_same_spacing_is_a_copy():
    a = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    out = resample(a, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(out, a)
    assert out is not a


def test_resample_rejects_bad_input():
    with pytest.raises(PreprocessError):
        resample(np.zeros((4, 4)), (1, 1, 1), (1, 1, 1))
    with pytest.raises(PreprocessError):
        resample(np.zeros((4, 4, 4)), (1, 1, 1), (0, 1, 1))


def test_window_maps_linearly_and_clips():
    hu = np.array([-2000, -1000, -300, 400, 3000], dtype=np.float64)
    np.testing.assert_allclose(window(hu, -1000, 400), [0, 0, 0.5, 1, 1], atol=1e-6)
    assert hu[0] == -2000  # the input is left alone unless out= says otherwise
    f32 = hu.astype(np.float32)
    assert window(f32, -1000, 400, out=f32) is f32 and f32.max() == 1.0
    with pytest.raises(PreprocessError):
        window(hu, 10, 10)


def test_preprocess_and_back_to_the_source_grid(series_writer, nodule_model):
    card: ModelCard = nodule_model.card
    vol = load_series(series_writer(shape=(20, 40, 40), spacing=(2.0, 1.5, 1.5)))
    image, info = preprocess(vol, card)
    assert image.dtype == np.float32 and image.min() >= 0.0 and image.max() <= 1.0
    assert info.model_shape == image.shape == (20, 30, 30)
    assert info.source_shape == vol.voxels.shape and info.target_spacing == (2.0, 2.0, 2.0)

    labels = (image > 0.5).astype(np.uint8)  # the sphere, on the model grid
    back = to_source_grid(labels, info, order=0)
    assert back.shape == vol.voxels.shape and back.dtype == np.uint8
    truth = vol.voxels > 0
    dice = 2 * np.sum(truth & (back == 1)) / (truth.sum() + back.sum())
    assert dice > 0.8
    probs = to_source_grid(np.stack([image, 1 - image]), info, order=1)
    assert probs.shape == (2, *vol.voxels.shape) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    with pytest.raises(PreprocessError):
        to_source_grid(np.zeros((3, 3, 3)), info)
