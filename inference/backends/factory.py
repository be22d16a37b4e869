"""Pick a backend for a registered model by name: "onnxruntime" (default), "triton" or "torch"."""

from __future__ import annotations

from typing import Any

from inference.backends.base import Backend
from inference.errors import BackendError
from inference.model_repo import RegisteredModel

KINDS = ("onnxruntime", "triton", "torch")


def make_backend(model: RegisteredModel, kind: str = "onnxruntime", **options: Any) -> Backend:
    """Create a warm backend for `model`.

    options: onnxruntime -> providers, intra_op_threads; triton -> url (required), protocol ("grpc"),
    shared_memory (False); torch -> module (nn.Module) or torchscript_path, device.
    Backend modules are imported lazily so that a deployment needs only the one it uses.
    """
    names = {"input_names": [model.card.input.name], "output_names": [model.card.output.name]}
    if kind == "onnxruntime":
        from inference.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model.weights_path, name=model.name, providers=options.get("providers"),
                                  intra_op_threads=int(options.get("intra_op_threads", 0)))
    if kind == "triton":
        if "url" not in options:
            raise BackendError(f"{model.name}: the triton backend needs options['url']")
        from inference.backends.triton_backend import TritonBackend

        return TritonBackend(model_name=model.name, url=options["url"],
                             protocol=options.get("protocol", "grpc"),
                             shared_memory=bool(options.get("shared_memory", False)), **names)
    if kind == "torch":
        from inference.backends.torch_backend import TorchBackend

        module = options.get("module", options.get("torchscript_path"))
        if module is None:
            raise BackendError(f"{model.name}: the torch backend needs options['module'] or ['torchscript_path']")
        return TorchBackend(module, name=model.name, device=options.get("device"), **names)
    raise BackendError(f"unknown backend kind {kind!r}; expected one of {KINDS}")
