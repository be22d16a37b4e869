"""Test-time flips: each mirrored pass is mirrored back and the probabilities are averaged."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from inference.model_card import ModelCard
from inference.model_pass import model_logits
from inference.sliding_window import sliding_window_infer

SHAPE = (6, 8, 10)


class ShiftBackend:
    """A real backend that is not mirror-symmetric: channel c = the image shifted by c + 1 columns, minus 0.5."""

    name = "shift"

    def __init__(self, channels: int = 1) -> None:
        self.channels = channels

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["image"]
        return {"logits": np.concatenate([np.roll(x, c + 1, axis=-1) - 0.5 for c in range(self.channels)], axis=1)
                * 4.0}

    def close(self) -> None:
        pass


def _card(flips: list, channels: int = 1, activation: str = "sigmoid") -> ModelCard:
    return ModelCard.model_validate({
        "name": "t", "version": "1", "task": "lung-nodule-detection", "description": "test", "modality": ["CT"],
        "body_part": ["CHEST"], "postprocess": "nodules",
        "input": {"spacing_mm": [1, 1, 1], "window": [-1000, 400], "roi_size": list(SHAPE), "overlap": 0.0,
                  "flips": flips},
        "output": {"channels": channels, "activation": activation}, "labels": [],
        "series": {"modalities": ["CT"]}, "weights_sha256": "0" * 64})


def _image() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, SHAPE).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def test_no_flips_is_one_sliding_window_pass() -> None:
    image, backend = _image(), ShiftBackend()
    plain = sliding_window_infer(image, backend, "image", "logits", SHAPE, 0.0, 4, 1)
    np.testing.assert_array_equal(model_logits(image, backend, _card([])), plain)


def test_flipped_passes_are_mirrored_back_and_averaged_as_probabilities() -> None:
    image, backend = _image(), ShiftBackend()

    def f(x: np.ndarray) -> np.ndarray:  # the backend on one whole-image window
        return backend.infer({"image": x[None, None]})["logits"][0]

    probs = [_sigmoid(f(image)), np.flip(_sigmoid(f(np.flip(image, 2))), 3),
             np.flip(_sigmoid(f(np.flip(image, (0, 1)))), (1, 2))]
    expected = np.mean(probs, axis=0)
    out = model_logits(image, backend, _card([[2], [0, 1]]))
    assert out.shape == (1, *SHAPE) and out.dtype == np.float32
    np.testing.assert_allclose(_sigmoid(out), expected, atol=1e-5)
    # the mirrored passes really differ here, so the average is not the plain pass
    assert np.abs(expected - probs[0]).max() > 0.1


def test_softmax_outputs_average_the_class_probabilities() -> None:
    image, backend = _image(), ShiftBackend(channels=3)

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(0, keepdims=True))
        return e / e.sum(0, keepdims=True)

    def f(x: np.ndarray) -> np.ndarray:
        return backend.infer({"image": x[None, None]})["logits"][0]

    expected = 0.5 * (softmax(f(image)) + np.flip(softmax(f(np.flip(image, 1))), 2))
    out = model_logits(image, backend, _card([[1]], channels=3, activation="softmax"))
    np.testing.assert_allclose(softmax(out), expected, atol=1e-5)


def test_a_voxelwise_network_is_unchanged_by_flips() -> None:
    class Voxelwise(ShiftBackend):
        def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"logits": 3.0 * inputs["image"] - 1.0}

    image = _image()
    plain = model_logits(image, Voxelwise(), _card([]))
    flipped = model_logits(image, Voxelwise(), _card([[0], [1], [2], [1, 2]]))
    np.testing.assert_allclose(flipped, plain, atol=1e-4)


@pytest.mark.parametrize("flips", [[[3]], [[1, 1]], [[-1]]])
def test_card_refuses_impossible_flip_axes(flips: list) -> None:
    with pytest.raises(ValidationError, match="flip axes"):
        _card(flips)
