"""One generated case through the gateway's own code (`inference.preprocess`, `inference.model_pass`), and the
FROC components of its model-grid probability map."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage

from inference.model_pass import model_logits
from inference.postprocess import sigmoid
from inference.preprocess import preprocess
from training.datasets import entry_volume

CANDIDATE_FLOOR = 0.05  # FROC candidates: components of the probability map above this

Components = list[tuple[tuple[float, float, float], float, int]]


class TorchBackend:
    """The gateway's Backend protocol over an in-memory network (ONNX parity is checked at registration)."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net.eval()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {"logits": self.net(torch.from_numpy(np.ascontiguousarray(inputs["image"]))).numpy()}

    def close(self) -> None:
        return None


def infer_case(entry: dict[str, Any], card: Any, backend: Any) -> tuple[Any, np.ndarray, Any, np.ndarray]:
    """One case through the gateway's preprocess and sliding window: (volume, image, info, logits)."""
    volume = entry_volume(entry)
    image, info = preprocess(volume, card)
    logits = model_logits(image, backend, card)
    return volume, image, info, logits


def model_grid_hu(image: np.ndarray, card: Any) -> np.ndarray:
    """The preprocessed image (windowed to [0, 1]) back in HU, clipped to the card's window."""
    low, high = card.input.window
    return low + np.asarray(image, dtype=np.float32) * (high - low)


def component_labels(prob: np.ndarray, floor: float = CANDIDATE_FLOOR) -> np.ndarray:
    """Connected components (26-neighbourhood) of the model-grid probability map above `floor`."""
    return ndimage.label(prob > floor, structure=np.ones((3, 3, 3), dtype=bool))[0]


def nodule_components(prob: np.ndarray, volume: Any, info: Any, floor: float = CANDIDATE_FLOOR,
                      limit: int = 500, hu: np.ndarray | None = None, min_mean_hu: float | None = None,
                      max_mean_hu: float | None = None, labels: np.ndarray | None = None) -> Components:
    """FROC candidates of the sigmoid map `prob`: components at p > floor as (centre mm, max probability, id in
    `labels`, the `component_labels` of the map at `floor`, computed here when not given).

    Measured on the model grid (mapping a 0.05-thresholded map back to a 512-row source grid costs minutes); the
    operating point itself is scored through the gateway's postprocess. With `hu` (the model-grid image in HU)
    components averaging below `min_mean_hu` or above `max_mean_hu` are dropped, as the gateway's postprocess
    does. Keeps the `limit` most probable components.
    """
    components = component_labels(prob, floor) if labels is None else labels
    n = int(components.max(initial=0))
    if n == 0:
        return []
    ids = np.arange(1, n + 1)
    maxima = np.asarray(ndimage.maximum(prob, components, ids))
    if hu is not None and (min_mean_hu is not None or max_mean_hu is not None):
        mean_hu = np.asarray(ndimage.mean(hu, components, ids))
        low = -np.inf if min_mean_hu is None else min_mean_hu
        high = np.inf if max_mean_hu is None else max_mean_hu
        maxima[(mean_hu < low) | (mean_hu > high)] = -1.0
        ids = ids[maxima >= 0]
        if ids.size == 0:
            return []
    keep = ids[np.argsort(-maxima[ids - 1])[:limit]]
    centres = np.asarray(ndimage.center_of_mass(prob, components, keep), dtype=float).reshape(-1, 3)
    source_index = centres * (np.asarray(info.target_spacing) / np.asarray(info.source_spacing))
    return [(tuple(float(v) for v in volume.index_to_patient(c)), float(maxima[k - 1]), int(k))  # type: ignore[misc]
            for c, k in zip(source_index, keep, strict=True)]


def nodule_candidates(logits: np.ndarray, volume: Any, info: Any, hu: np.ndarray, card: Any
                      ) -> list[tuple[tuple[float, float, float], float]]:
    """The FROC curve's marks of one case: `nodule_components` of the sigmoid map, held to the card's
    min/max_mean_hu, as (centre mm, max probability)."""
    found = nodule_components(sigmoid(logits[0]), volume, info, hu=hu, min_mean_hu=card.thresholds.min_mean_hu,
                              max_mean_hu=card.thresholds.max_mean_hu)
    return [(c, p) for c, p, _ in found]
