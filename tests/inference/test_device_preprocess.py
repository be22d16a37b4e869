"""Device preprocessing (ONNX graph, run here on the CPU provider) equals the scipy preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from inference.device_preprocess import DevicePreprocessor, interpolation_matrix
from inference.preprocess import preprocess
from inference.volume import Volume


def _volume(voxels: np.ndarray, spacing=(1.25, 0.7, 0.7)) -> Volume:  # noqa: ANN001
    return Volume(voxels=voxels, spacing=spacing, origin=np.zeros(3), direction=np.eye(3),
                  sop_instance_uids=[f"1.2.3.{k}" for k in range(voxels.shape[0])], modality="CT",
                  frame_of_reference_uid="1.2.3.99")


@pytest.mark.parametrize(("n_in", "n_out", "scale"), [(10, 7, 1.5), (9, 20, 0.45), (5, 5, 1.0), (12, 4, 3.1)])
def test_interpolation_matrix_is_scipy_linear_with_clamped_edges(n_in, n_out, scale) -> None:
    x = np.random.default_rng(0).normal(size=n_in)
    expect = ndimage.affine_transform(x, [scale], output_shape=(n_out,), order=1, mode="nearest")
    np.testing.assert_allclose(interpolation_matrix(n_in, n_out, scale) @ x, expect, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
@pytest.mark.parametrize("spacing", [(1.25, 0.7, 0.7), (2.5, 1.6, 1.6), (1.5, 1.5, 1.5)])
def test_matches_scipy_preprocess(nodule_model, dtype, spacing) -> None:  # noqa: ANN001
    rng = np.random.default_rng(1)
    hu = rng.integers(-1024, 1500, size=(23, 40, 36)).astype(dtype)
    vol = _volume(hu, spacing)
    card = nodule_model.card.model_copy(update={"input": nodule_model.card.input.model_copy(
        update={"spacing_mm": (1.5, 1.5, 1.5), "window": (-1000.0, 400.0)})})
    expect, info = preprocess(vol, card)
    got, got_info = DevicePreprocessor(["CPUExecutionProvider"])(vol, card)
    assert got.dtype == np.float32 and got.shape == expect.shape
    assert got_info == info
    np.testing.assert_allclose(got, expect, atol=1e-5)


def test_only_a_cuda_session_gets_device_preprocessing(nodule_model) -> None:  # noqa: ANN001
    from inference.backends.onnxruntime_backend import OnnxRuntimeBackend
    from inference.device_preprocess import device_preprocessor_for

    cpu = OnnxRuntimeBackend(nodule_model.weights_path, "m", providers=["CPUExecutionProvider"])
    assert device_preprocessor_for(cpu) is None
    assert device_preprocessor_for(object()) is None


def test_model_runner_uses_the_given_preprocessor(nodule_model, series_writer) -> None:  # noqa: ANN001
    from inference.backends.onnxruntime_backend import OnnxRuntimeBackend
    from inference.pipeline import ModelRunner

    paths = series_writer()
    backend = OnnxRuntimeBackend(nodule_model.weights_path, "m", providers=["CPUExecutionProvider"])
    calls = []

    def device(volume, card):  # noqa: ANN001, ANN202
        calls.append(volume.voxels.dtype)
        return DevicePreprocessor(["CPUExecutionProvider"])(volume, card)

    on_device = ModelRunner(nodule_model, backend, preprocessor=device).run(paths)
    on_cpu = ModelRunner(nodule_model, backend).run(paths)
    assert calls == [np.int16]
    assert [f.label for f in on_device.findings] == [f.label for f in on_cpu.findings]
    np.testing.assert_array_equal(on_device.label_map, on_cpu.label_map)
