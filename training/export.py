"""Export a trained network to ONNX (opset 17, dynamic B/Z/Y/X) and check ONNX Runtime parity."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

DYNAMIC_AXES = {0: "B", 2: "Z", 3: "Y", 4: "X"}


class ParityError(RuntimeError):
    """The ONNX model's output differs from the PyTorch network's by more than the tolerance."""


def export_onnx(
    net: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str = "image",
    output_name: str = "logits", opset: int = 17, dynamic: bool = True,
) -> None:
    """Write `net` (evaluated in eval mode on CPU) to `path` as a checked ONNX model.

    Input/output are float32 [B, 1, Z, Y, X] -> [B, C, Z, Y, X]; with `dynamic` the B, Z, Y and X axes are
    symbolic so the inference sliding window may use any patch and batch size.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    net = net.to("cpu").eval()
    axes = {input_name: DYNAMIC_AXES, output_name: DYNAMIC_AXES} if dynamic else None
    tmp = path.with_suffix(path.suffix + ".tmp")
    with warnings.catch_warnings(), torch.no_grad():
        # InstanceNorm is exported with train=True: it normalises with the patch's own statistics in both
        # modes (track_running_stats=False), so this warning does not indicate a train/eval difference.
        warnings.filterwarnings("ignore", message=".*instance_norm.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # shape checks traced as constants
        torch.onnx.export(
            net, (example.to("cpu", torch.float32),), str(tmp), input_names=[input_name],
            output_names=[output_name], opset_version=opset, dynamic_axes=axes, dynamo=False,
        )
    model = onnx.load(str(tmp))
    onnx.checker.check_model(model)
    tmp.replace(path)


def onnx_io_names(path: Path) -> tuple[list[str], list[str]]:
    """Graph input and output names of an ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    return ([i.name for i in model.graph.input if i.name not in initializers], [o.name for o in model.graph.output])


def parity_check(
    net: torch.nn.Module, onnx_path: Path, inputs: Sequence[np.ndarray], atol: float = 1e-4
) -> float:
    """Max |torch - onnxruntime| over `inputs` (each float32 [B, 1, Z, Y, X]); raises ParityError above atol."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, min(2, torch.get_num_threads()))
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    in_name = session.get_inputs()[0].name
    net = net.to("cpu").eval()
    worst = 0.0
    for x in inputs:
        x = np.ascontiguousarray(x, dtype=np.float32)
        with torch.no_grad():
            expected = net(torch.from_numpy(x)).numpy()
        got = session.run(None, {in_name: x})[0]
        if got.shape != expected.shape:
            raise ParityError(f"{onnx_path}: output shape {got.shape} != torch {expected.shape}")
        worst = max(worst, float(np.max(np.abs(got - expected))))
    if worst > atol:
        raise ParityError(f"{onnx_path}: max |torch - onnx| = {worst:.3g} > {atol:.3g}")
    return worst
