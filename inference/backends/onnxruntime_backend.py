"""ONNX Runtime in-process backend: one session per model, created once and kept warm."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from inference.errors import BackendError

log = logging.getLogger(__name__)

_PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}


def default_providers() -> list[str]:
    """TensorRT, then CUDA, then CPU: those of them this onnxruntime build offers."""
    available = set(ort.get_available_providers())
    return [p for p in _PREFERRED if p in available] or ["CPUExecutionProvider"]


class OnnxRuntimeBackend:
    """`infer(inputs) -> outputs` over an ONNX model; IO binding keeps outputs on the GPU until copied once."""

    def __init__(self, model_path: Path, name: str, providers: list[str] | None = None,
                 intra_op_threads: int = 0) -> None:
        self.name = name
        self.model_path = Path(model_path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(intra_op_threads)
        wanted = list(providers) if providers else default_providers()
        try:
            self._session = ort.InferenceSession(str(self.model_path), sess_options=options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            if wanted == ["CPUExecutionProvider"]:
                raise BackendError(f"{name}: cannot load {self.model_path}: {exc}") from exc
            log.warning("model %s: providers %s failed (%s); falling back to CPU", name, wanted, exc)
            try:
                self._session = ort.InferenceSession(str(self.model_path), sess_options=options,
                                                     providers=["CPUExecutionProvider"])
            except Exception as exc2:
                raise BackendError(f"{name}: cannot load {self.model_path}: {exc2}") from exc2
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        self._providers = list(self._session.get_providers())
        self._use_io_binding = self._providers[0] in GPU_PROVIDERS
        log.info("model %s: onnxruntime session on %s", name, self._session.get_providers())

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually uses, in priority order."""
        return list(self._providers)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise BackendError(f"{self.name}: backend is closed")
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise BackendError(f"{self.name}: missing inputs {sorted(missing)} (model expects {self.input_names})")
        feeds = {k: np.ascontiguousarray(inputs[k]) for k in self.input_names}
        try:
            if self._use_io_binding:
                return self._infer_bound(feeds)
            values = self._session.run(self.output_names, feeds)
        except Exception as exc:
            raise BackendError(f"{self.name}: onnxruntime run failed: {exc}") from exc
        return dict(zip(self.output_names, values, strict=True))

    def _infer_bound(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """GPU path: inputs copied to the device once, outputs allocated there and copied back once."""
        binding = self._session.io_binding()
        for key, value in feeds.items():
            binding.bind_cpu_input(key, value)
        for key in self.output_names:
            binding.bind_output(key, "cuda")
        self._session.run_with_iobinding(binding)
        values = binding.copy_outputs_to_cpu()
        return dict(zip(self.output_names, values, strict=True))

    def close(self) -> None:
        """Release the session (and its device memory)."""
        self._session = None  # type: ignore[assignment]

    def __enter__(self) -> OnnxRuntimeBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
