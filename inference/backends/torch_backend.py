"""PyTorch backend (eager nn.Module or TorchScript file), for benchmarks against ONNX Runtime.

torch is imported lazily here only: the inference package must load without it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inference.errors import BackendError

log = logging.getLogger(__name__)


class TorchBackend:
    """`infer(inputs) -> outputs` over a torch module; inputs are passed positionally in `input_names` order."""

    def __init__(self, module: Any, name: str, input_names: Sequence[str] = ("image",),
                 output_names: Sequence[str] = ("logits",), device: str | None = None) -> None:
        try:
            import torch
        except ImportError as exc:  # the GPU inference image may not ship torch
            raise BackendError("the torch backend needs PyTorch installed") from exc
        self._torch = torch
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            if isinstance(module, str | Path):
                module = torch.jit.load(str(module), map_location=self.device)
            self._module = module.to(self.device).eval()
        except Exception as exc:
            raise BackendError(f"{name}: cannot load torch module: {exc}") from exc
        log.info("model %s: torch backend on %s", name, self.device)

    @property
    def providers(self) -> list[str]:
        return [f"torch:{self.device.type}"]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._module is None:
            raise BackendError(f"{self.name}: backend is closed")
        torch = self._torch
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise BackendError(f"{self.name}: missing inputs {sorted(missing)}")
        try:
            with torch.inference_mode():
                args = [torch.from_numpy(np.ascontiguousarray(inputs[k])).to(self.device) for k in self.input_names]
                out = self._module(*args)
                values = list(out) if isinstance(out, tuple | list) else [out]
                if len(values) != len(self.output_names):
                    raise BackendError(f"{self.name}: module returned {len(values)} outputs, "
                                       f"expected {self.output_names}")
                return {k: v.detach().float().cpu().numpy() for k, v in zip(self.output_names, values, strict=True)}
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"{self.name}: torch forward failed: {exc}") from exc

    def close(self) -> None:
        self._module = None
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()
