"""Hard-negative mining: false-positive peaks away from nodules become patch centres of their own class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.transforms import RandCropByLabelClassesd

from training.hard_negatives import (
    CASE_KEY,
    HardNegativeIndicesd,
    HardNegativeStore,
    false_positive_centres,
    mine,
)
from training.transforms import HARD_NEGATIVE_CLASS, INDICES_KEY, sampling_classes, sampling_ratios

SHAPE = (20, 24, 24)


def _maps() -> tuple[np.ndarray, np.ndarray]:
    prob = np.zeros(SHAPE, np.float32)
    label = np.zeros(SHAPE, np.uint8)
    label[4:7, 4:7, 4:7] = 1
    prob[4:7, 4:7, 4:7] = 0.9            # the nodule itself: a hit
    prob[8, 4, 5] = 0.7                  # touching the nodule's margin: not counted
    prob[14:16, 15:17, 15:17] = 0.6      # a false positive, peak below
    prob[15, 16, 16] = 0.95
    prob[2, 20, 20] = 0.8                # a one-voxel false positive
    prob[10, 12, 2] = 0.4                # below the threshold
    return prob, label


def test_false_positive_centres_are_the_peaks_away_from_nodules() -> None:
    prob, label = _maps()
    centres = false_positive_centres(prob, label, threshold=0.5)
    expected = [np.ravel_multi_index((15, 16, 16), SHAPE), np.ravel_multi_index((2, 20, 20), SHAPE)]
    assert centres.tolist() == expected                      # most probable first
    assert false_positive_centres(prob, label, threshold=0.5, limit=1).tolist() == expected[:1]
    assert false_positive_centres(prob, label, threshold=0.99).size == 0


def test_mined_centres_are_where_the_hard_negative_patches_are_cut() -> None:
    store = HardNegativeStore()
    centre = (10, 12, 12)
    store.centres[3] = np.array([np.ravel_multi_index(centre, SHAPE)])
    image = torch.arange(np.prod(SHAPE), dtype=torch.float32).reshape(1, *SHAPE)
    n = sampling_classes("lung-nodule")
    empty = [np.zeros(0, np.int64)] * n
    everywhere = np.arange(np.prod(SHAPE))
    item = {"image": image, "label": torch.zeros(1, *SHAPE), CASE_KEY: 3,
            INDICES_KEY: [everywhere] + empty[1:]}
    ratios = [0.0] * n
    ratios[HARD_NEGATIVE_CLASS] = 1.0               # only the mined class may be drawn
    crop = RandCropByLabelClassesd(keys=["image", "label"], label_key="label", spatial_size=(4, 4, 4),
                                   ratios=ratios, num_classes=n, num_samples=3, indices_key=INDICES_KEY, warn=False)
    patches = crop(HardNegativeIndicesd(store)(item))
    flat = int(np.ravel_multi_index(centre, SHAPE))
    for p in patches:                                 # the patch's centre voxel is the mined one
        assert int(p["image"][0, 2, 2, 2]) == flat
    # another case keeps its cached (empty) class: nothing is replaced
    other = HardNegativeIndicesd(store)({**item, CASE_KEY: 4})
    assert len(other[INDICES_KEY][HARD_NEGATIVE_CLASS]) == 0


def test_the_mined_class_is_drawn_only_with_a_weight() -> None:
    assert len(sampling_ratios("lung-nodule", 1.0, 2.0)) == sampling_classes("lung-nodule")
    assert sampling_ratios("lung-nodule", 1.0, 2.0)[HARD_NEGATIVE_CLASS] == 0.0
    assert sampling_ratios("lung-nodule", 1.0, 2.0, hard=0.7)[HARD_NEGATIVE_CLASS] == 0.7


class _Bright(torch.nn.Module):
    """A real (untrained) network stand-in: logit = 20 * (image - 0.5), so bright voxels are 'nodules'."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * (x - 0.5)


def test_mine_finds_the_bright_spot_that_is_not_labelled(tmp_path: Path) -> None:
    image = np.zeros((1, *SHAPE), np.float32)
    label = np.zeros((1, *SHAPE), np.uint8)
    image[0, 4:7, 4:7, 4:7] = 1.0
    label[0, 4:7, 4:7, 4:7] = 1                    # labelled nodule
    image[0, 14, 18, 18] = 1.0                     # unlabelled: a false positive
    entries = [{CASE_KEY: 0, "image": image, "label": label}]
    store = mine(_Bright(), entries, lambda d: d, roi_size=(8, 8, 8), overlap=0.25, threshold=0.5)
    assert store.centres[0].tolist() == [np.ravel_multi_index((14, 18, 18), SHAPE)]
    store.save(tmp_path / "hn.npz")
    again = HardNegativeStore()
    again.load(tmp_path / "hn.npz")
    assert again.centres[0].tolist() == store.centres[0].tolist() and len(again) == 1
