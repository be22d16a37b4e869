"""TritonBackend against a real tritonserver: same outputs as in-process ONNX Runtime, clear errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from harness.system import free_port
from inference.errors import BackendError

pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (pip install 'dxgate[triton]')")

from harness.triton_server import TritonEndpoints, TritonUnavailable, serve_onnx_model  # noqa: E402
from inference.backends.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from inference.backends.triton_backend import TritonBackend  # noqa: E402

pytestmark = pytest.mark.integration
NAME = "lung_nodule_ct"


@pytest.fixture(scope="module")
def model_path(smoke_models_dir: Path) -> Path:
    return next((smoke_models_dir / NAME).glob("*/model.onnx"))


@pytest.fixture(scope="module")
def triton(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonEndpoints]:
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    try:
        with serve_onnx_model(model_path, NAME, log_path=log) as endpoints:
            yield endpoints
    except TritonUnavailable as exc:
        pytest.skip(f"tritonserver cannot start here: {exc}")


@pytest.fixture(scope="module")
def reference(model_path: Path) -> Iterator[OnnxRuntimeBackend]:
    backend = OnnxRuntimeBackend(model_path, NAME, providers=["CPUExecutionProvider"], intra_op_threads=1)
    yield backend
    backend.close()


def _url(triton: TritonEndpoints, protocol: str) -> str:
    return triton.grpc_url if protocol == "grpc" else triton.http_url


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("shared_memory", [False, True], ids=["wire", "shm"])
def test_outputs_equal_onnxruntime(
    triton: TritonEndpoints, reference: OnnxRuntimeBackend, protocol: str, shared_memory: bool
) -> None:
    rng = np.random.default_rng(7)
    backend = TritonBackend(NAME, _url(triton, protocol), protocol=protocol, shared_memory=shared_memory)
    try:
        assert backend.input_names == ["image"] and backend.output_names == ["logits"]
        # Same shape twice (the second call reuses the regions, outputs via shm), then a larger one (regrow).
        for shape in [(1, 1, 16, 32, 32), (1, 1, 16, 32, 32), (2, 1, 16, 40, 32)]:
            image = rng.random(shape, dtype=np.float32)
            got = backend.infer({"image": image})["logits"]
            want = reference.infer({"image": image})["logits"]
            assert got.shape == want.shape and got.dtype == np.float32
            assert float(np.max(np.abs(got - want))) <= 1e-5
    finally:
        backend.close()
        backend.close()  # idempotent


def test_close_unregisters_shared_memory(triton: TritonEndpoints) -> None:
    import tritonclient.http as httpclient

    backend = TritonBackend(NAME, triton.http_url, protocol="http", shared_memory=True)
    image = np.zeros((1, 1, 16, 32, 32), np.float32)
    backend.infer({"image": image})
    backend.infer({"image": image})
    tag = backend._tag
    client = httpclient.InferenceServerClient(triton.http_url)
    try:
        registered = [r["name"] for r in client.get_system_shared_memory_status()]
        assert any(name.startswith(tag) for name in registered)
        backend.close()
        registered = [r["name"] for r in client.get_system_shared_memory_status()]
        assert not any(name.startswith(tag) for name in registered)
    finally:
        client.close()
    with pytest.raises(BackendError, match="closed"):
        backend.infer({"image": image})


def test_unreachable_server_is_a_backend_error() -> None:
    with pytest.raises(BackendError, match="cannot reach Triton") as info:
        TritonBackend(NAME, f"127.0.0.1:{free_port()}", protocol="grpc", timeout_s=2)
    assert info.value.__cause__ is not None
    with pytest.raises(BackendError, match="cannot reach Triton"):
        TritonBackend(NAME, f"127.0.0.1:{free_port()}", protocol="http", timeout_s=2)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_model_not_ready_is_a_backend_error(triton: TritonEndpoints, protocol: str) -> None:
    with pytest.raises(BackendError, match="not ready"):
        TritonBackend("no_such_model", _url(triton, protocol), protocol=protocol)


def test_shape_mismatch_and_missing_input(triton: TritonEndpoints) -> None:
    with TritonBackend(NAME, triton.grpc_url) as backend:
        with pytest.raises(BackendError, match="shape"):
            backend.infer({"image": np.zeros((1, 16, 32, 32), np.float32)})
        with pytest.raises(BackendError, match="shape"):
            backend.infer({"image": np.zeros((1, 3, 16, 32, 32), np.float32)})
        with pytest.raises(BackendError, match="missing inputs"):
            backend.infer({"volume": np.zeros((1, 1, 16, 32, 32), np.float32)})
    with pytest.raises(BackendError, match="no input"):
        TritonBackend(NAME, triton.grpc_url, input_names=["volume"])
