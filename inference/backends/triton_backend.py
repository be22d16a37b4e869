"""Triton Inference Server backend: named tensors over gRPC or HTTP, optionally via system shared memory.

`tritonclient` is imported lazily, so `inference` imports without it. System shared memory only
works when Triton runs on the same host (it maps the same /dev/shm regions); regions are registered
once, grown when a larger tensor arrives, reused across calls and unregistered by `close()`.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from inference.errors import BackendError

log = logging.getLogger(__name__)
_PROTOCOLS = ("grpc", "http")
_COUNTER = itertools.count()


@dataclass
class _Region:
    """One registered region of Triton's system shared-memory extension."""

    name: str
    key: str
    byte_size: int
    handle: Any


def _strip_scheme(url: str) -> str:
    for scheme in ("grpc://", "http://", "https://"):
        if url.startswith(scheme):
            return url[len(scheme):]
    return url


class TritonBackend:
    """`infer(inputs) -> outputs` against a model served by a Triton Inference Server."""

    def __init__(
        self,
        model_name: str,
        url: str,
        protocol: str = "grpc",
        shared_memory: bool = False,
        input_names: list[str] | None = None,
        output_names: list[str] | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        if protocol not in _PROTOCOLS:
            raise BackendError(f"{model_name}: unknown Triton protocol {protocol!r}; expected one of {_PROTOCOLS}")
        self.name = model_name
        self.url = _strip_scheme(url)
        self.protocol = protocol
        self.shared_memory = shared_memory
        self.timeout_s = float(timeout_s)
        self._lock = threading.Lock()
        self._regions: dict[tuple[str, str], _Region] = {}
        self._output_nbytes: dict[tuple, dict[str, int]] = {}
        self._tag = f"dxgate_{os.getpid()}_{next(_COUNTER)}_{uuid.uuid4().hex[:8]}"
        try:
            if protocol == "grpc":
                import tritonclient.grpc as tc
            else:
                import tritonclient.http as tc
            from tritonclient.utils import InferenceServerException, triton_to_np_dtype
        except ImportError as exc:
            raise BackendError(
                f"{model_name}: the triton backend needs tritonclient (pip install 'dxgate[triton]')"
            ) from exc
        self._tc = tc
        self._server_error = InferenceServerException
        self._to_np = triton_to_np_dtype
        self._client = self._connect()
        self._inputs, self._outputs = self._read_metadata()
        self.input_names = list(input_names) if input_names else list(self._inputs)
        self.output_names = list(output_names) if output_names else list(self._outputs)
        for names, known, kind in ((self.input_names, self._inputs, "input"),
                                   (self.output_names, self._outputs, "output")):
            unknown = [n for n in names if n not in known]
            if unknown:
                self.close()
                raise BackendError(f"{model_name}: Triton model has no {kind}(s) {unknown} (it has {list(known)})")
        log.info("model %s: triton %s at %s (shared memory: %s)", model_name, protocol, self.url, shared_memory)

    # -- connection ----------------------------------------------------------------------------
    def _connect(self) -> Any:
        where = f"Triton at {self.url} ({self.protocol})"
        try:
            if self.protocol == "grpc":
                client = self._tc.InferenceServerClient(url=self.url)
                live = client.is_server_live(client_timeout=self.timeout_s)
            else:
                client = self._tc.InferenceServerClient(
                    url=self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
                )
                live = client.is_server_live()
        except Exception as exc:  # grpc/http transport errors of several types
            raise BackendError(f"{self.name}: cannot reach {where}: {exc}") from exc
        if not live:
            raise BackendError(f"{self.name}: {where} is not live")
        try:
            ready = client.is_model_ready(self.name)
        except Exception as exc:
            raise BackendError(f"{self.name}: cannot query model readiness at {where}: {exc}") from exc
        if not ready:
            raise BackendError(f"{self.name}: model {self.name!r} is not ready (not loaded) at {where}")
        return client

    def _read_metadata(self) -> tuple[dict[str, tuple[str, list[int]]], dict[str, tuple[str, list[int]]]]:
        """{name: (datatype, shape)} of inputs and outputs; -1 marks a dynamic dimension (batch included)."""
        try:
            if self.protocol == "grpc":
                meta = self._client.get_model_metadata(self.name, as_json=True)
            else:
                meta = self._client.get_model_metadata(self.name)
        except Exception as exc:
            raise BackendError(f"{self.name}: cannot read model metadata from Triton at {self.url}: {exc}") from exc

        def table(entries: list[dict[str, Any]]) -> dict[str, tuple[str, list[int]]]:
            return {e["name"]: (e["datatype"], [int(d) for d in e.get("shape", [])]) for e in entries}

        return table(meta.get("inputs", [])), table(meta.get("outputs", []))

    # -- inference -----------------------------------------------------------------------------
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._client is None:
            raise BackendError(f"{self.name}: backend is closed")
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise BackendError(f"{self.name}: missing inputs {missing} (model expects {self.input_names})")
        arrays = {n: self._checked(n, inputs[n]) for n in self.input_names}
        with self._lock:
            try:
                return self._infer_shm(arrays) if self.shared_memory else self._infer_plain(arrays)
            except BackendError:
                raise
            except self._server_error as exc:
                raise BackendError(f"{self.name}: Triton inference failed: {exc.message() or exc}") from exc
            except Exception as exc:
                raise BackendError(f"{self.name}: Triton inference failed ({self.url}): {exc}") from exc

    def _checked(self, name: str, value: np.ndarray) -> np.ndarray:
        datatype, shape = self._inputs[name]
        array = np.ascontiguousarray(value, dtype=self._to_np(datatype))
        fixed_ok = all(d < 0 or d == s for d, s in zip(shape, array.shape, strict=False))
        if shape and (array.ndim != len(shape) or not fixed_ok):
            raise BackendError(
                f"{self.name}: input {name!r} has shape {list(array.shape)}, Triton expects {shape} (-1 = any)"
            )
        return array

    def _requested_input(self, name: str, array: np.ndarray) -> Any:
        tensor = self._tc.InferInput(name, list(array.shape), self._inputs[name][0])
        return tensor

    def _run(self, tensors: list[Any], outputs: list[Any]) -> Any:
        if self.protocol == "grpc":
            return self._client.infer(self.name, tensors, outputs=outputs, client_timeout=self.timeout_s)
        return self._client.infer(self.name, tensors, outputs=outputs)

    def _infer_plain(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = []
        for name, array in arrays.items():
            tensor = self._requested_input(name, array)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = self._run(tensors, [self._requested_output(n) for n in self.output_names])
        return {n: self._as_numpy(result, n) for n in self.output_names}

    def _requested_output(self, name: str) -> Any:
        if self.protocol == "http":
            return self._tc.InferRequestedOutput(name, binary_data=True)
        return self._tc.InferRequestedOutput(name)

    def _as_numpy(self, result: Any, name: str) -> np.ndarray:
        value = result.as_numpy(name)
        if value is None:
            raise BackendError(f"{self.name}: Triton returned no output {name!r}")
        return value

    def _infer_shm(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs always through shared memory; outputs too once their size for these shapes is known."""
        import tritonclient.utils.shared_memory as shm

        tensors = []
        for name, array in arrays.items():
            region = self._region("in", name, array.nbytes)
            shm.set_shared_memory_region(region.handle, [array])
            tensor = self._requested_input(name, array)
            tensor.set_shared_memory(region.name, array.nbytes)
            tensors.append(tensor)
        signature = tuple((n, a.shape) for n, a in arrays.items())
        known = self._output_nbytes.get(signature)
        outputs = []
        for name in self.output_names:
            requested = self._requested_output(name)
            if known is not None:
                requested.set_shared_memory(self._region("out", name, known[name]).name, known[name])
            outputs.append(requested)
        result = self._run(tensors, outputs)
        if known is None:  # first call with these shapes: outputs came inline; remember their sizes
            values = {n: self._as_numpy(result, n) for n in self.output_names}
            self._output_nbytes[signature] = {n: int(v.nbytes) for n, v in values.items()}
            return values
        values = {}
        for name in self.output_names:
            output = result.get_output(name)
            if output is None:
                raise BackendError(f"{self.name}: Triton returned no output {name!r}")
            shape = [int(d) for d in (output["shape"] if isinstance(output, dict) else output.shape)]
            datatype = output["datatype"] if isinstance(output, dict) else output.datatype
            region = self._regions[("out", name)]
            view = shm.get_contents_as_numpy(region.handle, self._to_np(datatype), shape)
            values[name] = np.array(view, copy=True)  # the region is reused by the next call
        return values

    def _region(self, direction: str, name: str, nbytes: int) -> _Region:
        """The registered region for one tensor, (re)created when it is missing or too small."""
        import tritonclient.utils.shared_memory as shm

        region = self._regions.get((direction, name))
        if region is not None and region.byte_size >= nbytes:
            return region
        if region is not None:
            self._release(region)
            del self._regions[(direction, name)]
        region_name = f"{self._tag}_{direction}_{name}"
        key = f"/{region_name}"
        size = max(int(nbytes), 64)
        try:
            handle = shm.create_shared_memory_region(region_name, key, size)
        except Exception as exc:
            raise BackendError(f"{self.name}: cannot create shared memory region {key} ({size} B): {exc}") from exc
        try:
            self._client.register_system_shared_memory(region_name, key, size)
        except Exception as exc:
            shm.destroy_shared_memory_region(handle)
            raise BackendError(
                f"{self.name}: Triton at {self.url} refused shared memory region {key} "
                f"(is it on this host?): {exc}"
            ) from exc
        region = _Region(region_name, key, size, handle)
        self._regions[(direction, name)] = region
        return region

    def _release(self, region: _Region) -> None:
        import tritonclient.utils.shared_memory as shm

        try:
            self._client.unregister_system_shared_memory(region.name)
        except Exception as exc:  # the server may be gone; the local region is still freed
            log.warning("model %s: cannot unregister shared memory %s: %s", self.name, region.name, exc)
        try:
            shm.destroy_shared_memory_region(region.handle)
        except Exception as exc:
            log.warning("model %s: cannot destroy shared memory %s: %s", self.name, region.key, exc)

    def close(self) -> None:
        """Unregister and free shared-memory regions and close the connection. Safe to call twice."""
        with self._lock:
            if self._client is None:
                return
            for region in self._regions.values():
                self._release(region)
            self._regions.clear()
            try:
                self._client.close()
            except Exception as exc:
                log.debug("model %s: closing the Triton client: %s", self.name, exc)
            self._client = None

    def __enter__(self) -> TritonBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
