"""The backend interface: `infer(inputs: dict[str, ndarray]) -> dict[str, ndarray]`."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    """A loaded model kept warm. Inputs and outputs are named like the ONNX graph / Triton config."""

    name: str

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...
