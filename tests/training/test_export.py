"""ONNX export: dynamic axes, names and parity with PyTorch (the model card's input and output names)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.datasets import generate_dataset
from training.export import ParityError, export_onnx, onnx_io_names, parity_check
from training.networks import build_network
from training.transforms import val_transforms


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    net = build_network(3, channels=(4, 8, 16)).eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(net, torch.rand(1, 1, 16, 32, 32), path)
    return net, path


def test_export_names_and_dynamic_axes(exported: tuple[torch.nn.Module, Path]) -> None:
    import onnx

    _, path = exported
    assert onnx_io_names(path) == (["image"], ["logits"])
    model = onnx.load(str(path))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["B", 1, "Z", "Y", "X"]
    assert model.opset_import[0].version == 17


def test_parity_on_random_input_of_another_shape(exported: tuple[torch.nn.Module, Path]) -> None:
    net, path = exported
    rng = np.random.default_rng(1)
    inputs = [rng.random((2, 1, 24, 40, 32), dtype=np.float32), rng.random((1, 1, 16, 32, 32), dtype=np.float32)]
    assert parity_check(net, path, inputs, atol=1e-4) <= 1e-4


def test_parity_on_a_preprocessed_volume(exported: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    net, path = exported
    entry = generate_dataset("lung-nodule", tmp_path, "test", 1, seed=0, phantom=True, progress=False)[0]
    volume = val_transforms("lung-nodule", (3.0, 3.0, 3.0), (-1000.0, 400.0))(entry)["image"].numpy()
    assert parity_check(net, path, [volume[None]], atol=1e-4) <= 1e-4


def test_parity_check_rejects_a_different_network(exported: tuple[torch.nn.Module, Path]) -> None:
    _, path = exported
    other = build_network(3, channels=(4, 8, 16)).eval()
    with pytest.raises(ParityError):
        parity_check(other, path, [np.random.default_rng(2).random((1, 1, 16, 32, 32), dtype=np.float32)])
