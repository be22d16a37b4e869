"""Model folders: config.pbtxt, metadata.json and <version>/model.onnx agree and load in the gateway."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from inference.model_repo import composing_models, discover_models, load_model, sha256_file
from training.export import onnx_io_names
from training.networks import build_network
from training.register import card_fields_for, config_pbtxt, register_model
from training.smoke_model import build_smoke_model

REPO_MODELS = Path(__file__).resolve().parents[2] / "models"


def _check_folder(folder: Path) -> None:
    model = load_model(folder, verify_sha256=True)
    card = model.card
    assert model.weights_path == folder / card.version / "model.onnx"
    assert sha256_file(model.weights_path) == card.weights_sha256
    assert onnx_io_names(model.weights_path) == ([card.input.name], [card.output.name])
    text = (folder / "config.pbtxt").read_text()
    assert text == config_pbtxt(card.name, card.input.name, card.output.name, card.output.channels)
    assert "KIND_GPU" not in text and "dynamic_batching" not in text


def test_register_model_writes_a_consistent_folder(tmp_path: Path) -> None:
    net = build_network(1, channels=(4, 8, 16)).eval()
    fields = card_fields_for("lung-nodule", input={"name": "image", "spacing_mm": (3.0, 3.0, 3.0),
                                                   "window": (-1000.0, 400.0), "roi_size": (16, 32, 32)})
    folder = register_model(net, fields, tmp_path)
    assert folder == tmp_path / "lung_nodule_ct"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lung_nodule_ct"]  # no staging leftovers
    _check_folder(folder)
    card = json.loads((folder / "metadata.json").read_text())
    assert card["training"]["onnx_parity_max_abs_diff"] <= 1e-4
    # re-registering replaces the folder atomically
    register_model(build_network(1, channels=(4, 8, 16)).eval(), fields, tmp_path)
    assert load_model(folder).card.weights_sha256 != card["weights_sha256"]


def test_spine_card_codes() -> None:
    fields = card_fields_for("spine-vertebrae")
    labels = fields["labels"]
    assert [lab["index"] for lab in labels] == list(range(1, 26))
    assert labels[0]["finding"] == {"value": "14806007", "scheme": "SCT", "meaning": "C1 vertebra"}
    assert labels[-1]["finding"]["meaning"] == "Sacrum"
    assert len({lab["finding"]["value"] for lab in labels}) == 25
    assert fields["output"]["channels"] == 26


@pytest.mark.parametrize("name", ["lung_nodule_ct", "spine_vertebrae_ct"])
def test_smoke_model_is_a_valid_folder(tmp_path: Path, name: str) -> None:
    folder = build_smoke_model(tmp_path, name=name, steps=3)
    _check_folder(folder)
    card = load_model(folder).card
    assert card.name == name
    assert card.postprocess == ("nodules" if name == "lung_nodule_ct" else "vertebrae")


@pytest.mark.parametrize("name", ["lung_nodule_ct", "spine_vertebrae_ct", "lung_nodule_candidates_ct"])
def test_shipped_model_loads_and_runs(name: str) -> None:
    folder = REPO_MODELS / name
    if not (folder / "metadata.json").is_file():
        pytest.skip(f"{name} not shipped yet")
    _check_folder(folder)
    import onnxruntime as ort

    card = load_model(folder).card
    assert folder.stat().st_size >= 0 and load_model(folder).weights_path.stat().st_size <= 50 * 2**20
    assert card.training.get("data") == "synthetic" and card.metrics
    session = ort.InferenceSession(str(load_model(folder).weights_path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 1, *card.input.roi_size), dtype=np.float32)
    (out,) = session.run(None, {"image": x})
    if card.postprocess == "candidates":   # one logit per patch
        assert out.shape == (1, card.output.channels, 1, 1, 1)
        assert composing_models(card.name, discover_models(REPO_MODELS)), "a shipped card composes it"
    else:
        assert out.shape == (1, card.output.channels, *card.input.roi_size)
