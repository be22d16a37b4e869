"""ONNX Runtime backend on the trained tiny net: outputs, errors, parity with torch eager, the factory."""

from __future__ import annotations

import numpy as np
import pytest

from inference.backends.base import Backend
from inference.backends.factory import make_backend
from inference.backends.onnxruntime_backend import OnnxRuntimeBackend, default_providers
from inference.errors import BackendError


@pytest.fixture(scope="module")
def ort_backend(nodule_model):
    backend = OnnxRuntimeBackend(nodule_model.weights_path, nodule_model.name, intra_op_threads=2)
    yield backend
    backend.close()


def test_session_runs_on_cpu_with_dynamic_axes(ort_backend):
    assert isinstance(ort_backend, Backend)
    assert ort_backend.providers[-1] == "CPUExecutionProvider"
    assert "CPUExecutionProvider" in default_providers()
    assert ort_backend.input_names == ["image"] and ort_backend.output_names == ["logits"]
    for shape in [(1, 1, 8, 8, 8), (3, 1, 6, 10, 12)]:
        out = ort_backend.infer({"image": np.zeros(shape, np.float32)})
        assert set(out) == {"logits"} and out["logits"].shape == (shape[0], 1, *shape[2:])


def test_parity_with_torch_eager(ort_backend, tiny_net, nodule_model):
    x = np.random.default_rng(0).random((2, 1, 16, 12, 20), dtype=np.float32)
    torch_backend = make_backend(nodule_model, "torch", module=tiny_net, device="cpu")
    try:
        expected = torch_backend.infer({"image": x})["logits"]
    finally:
        torch_backend.close()
    got = ort_backend.infer({"image": x})["logits"]
    assert np.abs(got - expected).max() <= 1e-4


def test_torchscript_path(tmp_path, tiny_net, nodule_model, ort_backend):
    import torch

    path = tmp_path / "net.pt"
    torch.jit.trace(tiny_net, torch.zeros(1, 1, 8, 8, 8)).save(str(path))
    backend = make_backend(nodule_model, "torch", torchscript_path=path, device="cpu")
    x = np.random.default_rng(1).random((1, 1, 8, 8, 8), dtype=np.float32)
    assert np.abs(backend.infer({"image": x})["logits"] - ort_backend.infer({"image": x})["logits"]).max() <= 1e-4
    assert backend.providers == ["torch:cpu"]


def test_errors_are_backend_errors_with_cause(ort_backend, tmp_path):
    with pytest.raises(BackendError, match="missing inputs"):
        ort_backend.infer({"input": np.zeros((1, 1, 4, 4, 4), np.float32)})
    with pytest.raises(BackendError, match="run failed") as info:
        ort_backend.infer({"image": np.zeros((1, 2, 4, 4, 4), np.float32)})  # wrong channel count
    assert info.value.__cause__ is not None
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(BackendError, match="cannot load") as info:
        OnnxRuntimeBackend(bad, "bad", providers=["CPUExecutionProvider"])
    assert info.value.__cause__ is not None


def test_closed_backend_refuses(nodule_model):
    backend = make_backend(nodule_model, "onnxruntime", providers=["CPUExecutionProvider"], intra_op_threads=1)
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.infer({"image": np.zeros((1, 1, 4, 4, 4), np.float32)})


def test_factory_rejects_unknown_kinds_and_missing_options(nodule_model):
    with pytest.raises(BackendError, match="unknown backend kind"):
        make_backend(nodule_model, "tensorflow")
    with pytest.raises(BackendError, match="url"):
        make_backend(nodule_model, "triton")
    with pytest.raises(BackendError, match="module"):
        make_backend(nodule_model, "torch")


@pytest.mark.gpu
def test_cuda_provider_with_io_binding(nodule_model):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here")
    backend = OnnxRuntimeBackend(nodule_model.weights_path, "gpu", providers=["CUDAExecutionProvider"])
    cpu = OnnxRuntimeBackend(nodule_model.weights_path, "cpu", providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).random((2, 1, 16, 16, 16), dtype=np.float32)
    assert backend.providers[0] == "CUDAExecutionProvider"
    assert np.abs(backend.infer({"image": x})["logits"] - cpu.infer({"image": x})["logits"]).max() <= 1e-3
