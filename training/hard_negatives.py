"""Hard-negative mining for the nodule model: patches centred where the network itself is wrong.

Most of a chest CT is easy background; the false positives that decide the LUNA16 figures sit on vessel
forks, airway walls and the pleura, which random lung patches rarely hit. Every `hard_negative_every`
steps the current network runs (sliding window) over each training volume; every connected component of
its probability map above `hard_negative_threshold` that lies clear of a nodule is a false positive, and
its peak voxel becomes a patch centre of the last sampling class (`transforms.HARD_NEGATIVE_CLASS`),
drawn with weight `hard_negative_weight` from then on. Each component counts once, whatever its size.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import MapTransform, RandomizableTrait
from scipy import ndimage

from training.transforms import INDICES_KEY

CASE_KEY = "case"               # datalist index added to each training entry (the store's key)
NODULE_MARGIN_VOXELS = 3        # candidates this close to a labelled nodule are hits, not false positives
MAX_PER_CASE = 200              # most probable false-positive components kept per volume


class HardNegativeStore:
    """Mined patch centres per training case: flat indices into the cached (padded) volume."""

    def __init__(self) -> None:
        self.centres: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(sum(len(v) for v in self.centres.values()))

    def save(self, path: Path) -> None:
        np.savez(path, **{str(k): v for k, v in self.centres.items()})

    def load(self, path: Path) -> None:
        with np.load(path) as saved:
            self.centres = {int(k): saved[k] for k in saved.files}


class HardNegativeIndicesd(MapTransform, RandomizableTrait):
    """Puts the store's centres for this case into the last class of the cached sampling indices.

    Marked random (`RandomizableTrait`) so `CacheDataset` applies it on every draw instead of caching it.
    """

    def __init__(self, store: HardNegativeStore, indices_key: str = INDICES_KEY) -> None:
        super().__init__(keys=[indices_key])
        self.store = store
        self.indices_key = indices_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        centres = self.store.centres.get(int(d.get(CASE_KEY, -1)))
        if centres is not None and len(centres):
            indices = list(d[self.indices_key])
            indices[-1] = centres
            d[self.indices_key] = indices
        return d


def false_positive_centres(prob: np.ndarray, label: np.ndarray, threshold: float,
                           limit: int = MAX_PER_CASE) -> np.ndarray:
    """Flat indices of the peak voxel of each component of `prob > threshold` away from every nodule.

    `prob` and `label` are [Z, Y, X] on the same grid; the `limit` most probable components are kept.
    """
    clear = ~ndimage.binary_dilation(label > 0, iterations=NODULE_MARGIN_VOXELS)
    components, n = ndimage.label((prob > threshold) & clear, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    ids = np.arange(1, n + 1)
    peaks = np.asarray(ndimage.maximum(prob, components, ids))
    keep = ids[np.argsort(-peaks)[:limit]]
    positions = np.asarray(ndimage.maximum_position(prob, components, keep), dtype=np.int64).reshape(-1, 3)
    return np.ravel_multi_index(tuple(positions.T), prob.shape).astype(np.int64)


def mine(net: torch.nn.Module, entries: Sequence[dict[str, Any]], load: Any, roi_size: Sequence[int],
         overlap: float, threshold: float, bf16: bool = False) -> HardNegativeStore:
    """Run `net` over every training case (loaded by `load`, the cached chain) and collect its false positives."""
    store = HardNegativeStore()
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        for entry in entries:
            item = load(dict(entry))
            image = torch.as_tensor(np.asarray(item["image"], dtype=np.float32))[None].to(device)
            with torch.no_grad(), torch.autocast(device.type, enabled=bf16 or device.type == "cuda",
                                                 dtype=torch.bfloat16 if bf16 else None):
                logits = sliding_window_inference(image, tuple(roi_size), sw_batch_size=4, predictor=net,
                                                  overlap=overlap, mode="gaussian")
            prob = torch.sigmoid(logits.float())[0, 0].cpu().numpy()
            label = np.asarray(item["label"])[0]
            store.centres[int(entry[CASE_KEY])] = false_positive_centres(prob, label, threshold)
    finally:
        net.train(was_training)
    return store
