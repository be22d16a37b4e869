"""Fixtures for the inference pipeline tests: tiny DICOM CT series and a real, briefly trained 3D conv net.

Everything is synthetic (no patient data); the series come from `harness.ct.write_series`. The net is
trained for a few Adam steps on cubes with a bright sphere, exported to ONNX (opset 17, dynamic axes)
and written as a full model folder (Triton layout + model card) that `inference.model_repo.load_model`
accepts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from harness.ct import BACKGROUND_HU, SPHERE_HU, write_series
from inference.model_repo import RegisteredModel, load_model, sha256_file

WINDOW = (-1000.0, 400.0)
MODEL_NAME = "tiny_nodule"

SeriesWriter = Callable[..., list[Path]]


@pytest.fixture
def series_writer(tmp_path: Path) -> SeriesWriter:
    """`series_writer(name, **kwargs)` writes a series under tmp_path/name (see `write_series`)."""
    def make(name: str = "series", **kwargs: object) -> list[Path]:
        return write_series(tmp_path / name, **kwargs)  # type: ignore[arg-type]
    return make


def _training_batch(rng: np.random.Generator, n: int, size: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Windowed cubes with a sphere (values as after `preprocess`) and the sphere masks."""
    low, high = WINDOW
    bg, fg = (BACKGROUND_HU - low) / (high - low), (SPHERE_HU - low) / (high - low)
    zz, yy, xx = np.mgrid[0:size, 0:size, 0:size]
    images = np.empty((n, 1, size, size, size), dtype=np.float32)
    masks = np.empty_like(images)
    for b in range(n):
        c = rng.uniform(4, size - 4, 3)
        r = rng.uniform(2.0, 5.0)
        m = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
        images[b, 0] = np.where(m, fg, bg) + rng.normal(0, 0.01, m.shape)
        masks[b, 0] = m
    return images, masks


@pytest.fixture(scope="session")
def tiny_net():
    """A 3D conv net (two 3x3x3 convs) trained for 40 Adam steps to segment bright spheres."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 1, 3, padding=1)
    )
    opt = torch.optim.Adam(net.parameters(), lr=0.03)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(0)
    for _ in range(40):
        x, y = _training_batch(rng, 4)
        opt.zero_grad()
        loss = loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
    net.eval()
    net.final_loss = float(loss.detach())  # type: ignore[attr-defined]
    return net


def _card(sha: str) -> dict:
    sct = "SCT"
    return {
        "name": MODEL_NAME, "version": "1", "task": "lung-nodule-detection",
        "description": "Test-only tiny sphere segmenter", "modality": ["CT"], "body_part": ["CHEST"],
        "postprocess": "nodules",
        "input": {"name": "image", "spacing_mm": [2.0, 2.0, 2.0], "window": list(WINDOW),
                  "roi_size": [16, 16, 16], "overlap": 0.25, "batch_size": 2},
        "output": {"name": "logits", "activation": "sigmoid", "channels": 1},
        "labels": [{"index": 1, "name": "Lung nodule",
                    "finding": {"value": "27925004", "scheme": sct, "meaning": "Nodule"},
                    "category": {"value": "49755003", "scheme": sct,
                                 "meaning": "Morphologically abnormal structure"},
                    "site": {"value": "39607008", "scheme": sct, "meaning": "Lung"}}],
        "thresholds": {"probability": 0.5, "min_diameter_mm": 3.0},
        "series": {"modalities": ["CT"], "min_slices": 2},
        "weights_sha256": sha,
        "training": {"data": "synthetic spheres", "steps": 40, "seed": 0},
    }


_PBTXT = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [ {{ name: "image" data_type: TYPE_FP32 dims: [ -1, 1, -1, -1, -1 ] }} ]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ -1, 1, -1, -1, -1 ] }} ]
"""


@pytest.fixture(scope="session")
def nodule_model(tiny_net, tmp_path_factory: pytest.TempPathFactory) -> RegisteredModel:
    """The trained net as a model folder: metadata.json, config.pbtxt, 1/model.onnx."""
    import torch

    folder = tmp_path_factory.mktemp("models") / MODEL_NAME
    (folder / "1").mkdir(parents=True)
    onnx_path = folder / "1" / "model.onnx"
    axes = {0: "B", 2: "Z", 3: "Y", 4: "X"}
    torch.onnx.export(tiny_net, (torch.zeros(1, 1, 16, 16, 16),), str(onnx_path), dynamo=False,
                      opset_version=17, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": axes, "logits": axes})
    (folder / "metadata.json").write_text(json.dumps(_card(sha256_file(onnx_path)), indent=2))
    (folder / "config.pbtxt").write_text(_PBTXT.format(name=MODEL_NAME))
    return load_model(folder)
