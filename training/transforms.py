"""MONAI transform chains that reproduce the inference preprocessing (`inference.preprocess`).

Arrays stay in the source axis order [Z, Y, X] (slices sorted along the normal, rows, columns): the
volumes are written as NIfTI with a diagonal affine diag(sz, sy, sx), so `Spacingd` resamples axis 0 to
spacing_mm[0] and so on, exactly like `inference.preprocess.preprocess(volume, card)` (linear resampling
to card.input.spacing_mm, then HU window -> [0, 1], clipped). No reorientation is applied, because the
inference side applies none beyond slice sorting.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import (
    ClassesToIndicesd,
    Compose,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapLabelValued,
    MapTransform,
    RandAffined,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from scipy import ndimage

from training.nodule_insertion import RandInsertNoduled

KEYS = ("image", "label")

# VerSe label values (C1=1 .. L5=24, sacrum=26) -> output channels 1..25 (the spine model has 26 channels).
SPINE_LEVELS: tuple[str, ...] = (
    *(f"C{i}" for i in range(1, 8)),
    *(f"T{i}" for i in range(1, 13)),
    *(f"L{i}" for i in range(1, 6)),
    "Sacrum",
)
SPINE_VERSE_VALUES: tuple[int, ...] = (*range(1, 25), 26)

# Patch sampling classes for nodules: 0 = elsewhere, 1 = lung parenchyma (where vessels, the usual false
# positives, live), 2 = bone (ribs, vertebrae and sternum: round cross-sections a network sampling mostly
# lung patches calls nodules), 3.. = one class per nodule, so a 3 mm nodule is drawn as often as a 30 mm one.
SAMPLING_KEY = "sampling"
INDICES_KEY = "sampling_cls_indices"
LUNG_PARENCHYMA_HU = (-950.0, -500.0)
BONE_HU = 200.0
FIRST_NODULE_CLASS = 3
MAX_NODULE_CLASSES = 8
MAX_SAMPLES_PER_CLASS = 20000   # cached centre candidates per class (random subset of large classes)
CROP_JITTER = 16                # the sampled voxel lands anywhere within +-8 voxels of the patch centre


def crop_size(roi: Sequence[int]) -> tuple[int, ...]:
    """First crop around the sampled centre; a random `roi` window inside it follows (position jitter)."""
    return tuple(int(r) + CROP_JITTER for r in roi)


def sampling_classes(task: str) -> int:
    """Number of patch-sampling classes per task."""
    return FIRST_NODULE_CLASS + MAX_NODULE_CLASSES if task == "lung-nodule" else 1 + len(SPINE_LEVELS)


def sampling_ratios(task: str, pos: float, neg: float) -> list[float]:
    """Relative draw weights per sampling class (absent classes are skipped by MONAI).

    Nodules: of the negative weight, 0.3 elsewhere (soft tissue, air), 0.4 in the lungs and 0.3 on
    bone, `pos` per nodule. Vertebrae: `neg` for background, `pos` for
    every level (rare cervical levels as often as lumbar ones).
    """
    if task == "lung-nodule":
        return [0.3 * neg, 0.4 * neg, 0.3 * neg] + [pos] * MAX_NODULE_CLASSES
    return [neg] + [pos] * len(SPINE_LEVELS)


class NoduleSamplingMapd(MapTransform):
    """Adds `SAMPLING_KEY`: the nodule patch-sampling classes (see `sampling_classes`) of a windowed image."""

    def __init__(self, keys: KeysCollection, window: Sequence[float], label_key: str = "label") -> None:
        super().__init__(keys)
        low, high = float(window[0]), float(window[1])
        self.lung = tuple((hu - low) / (high - low) for hu in LUNG_PARENCHYMA_HU)
        self.bone = (BONE_HU - low) / (high - low)
        self.label_key = label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = np.asarray(d[key])
            label = np.asarray(d[self.label_key])
            out = ((image > self.lung[0]) & (image < self.lung[1])).astype(np.uint8)
            out[image > self.bone] = 2
            components, n = ndimage.label(label[0] > 0, structure=np.ones((3, 3, 3), dtype=bool))
            if n:
                nodule = components > 0
                out[0][nodule] = FIRST_NODULE_CLASS + (components[nodule] - 1) % MAX_NODULE_CLASSES
            d[SAMPLING_KEY] = out
        return d


def window_hu(hu: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """Reference windowing (numpy): HU -> [0, 1] linearly over (low, high), clipped; float32."""
    low, high = float(window[0]), float(window[1])
    return np.clip((hu.astype(np.float32) - low) / (high - low), 0.0, 1.0).astype(np.float32)


def spine_label_to_channel(label: np.ndarray) -> np.ndarray:
    """Map VerSe label values to output channels (26 sacrum -> 25; anything unknown -> background)."""
    lut = np.zeros(256, dtype=np.uint8)
    for channel, value in enumerate(SPINE_VERSE_VALUES, start=1):
        lut[value] = channel
    return lut[np.asarray(label, dtype=np.uint8)]


def load_transforms(task: str, spacing: Sequence[float], window: Sequence[float], compact: bool = False,
                    pad_to: Sequence[int] | None = None) -> list:
    """Deterministic part (cacheable): load, channel first, label remap, resample, window.

    `compact` keeps the cached image as float16 and the label as uint8 (a quarter of the memory), pads
    to `pad_to` (`crop_size(roi)`) and adds the patch-centre candidates per sampling class that
    `augment_transforms` draws from; it converts image and label back to float32.
    """
    chain: list = [
        LoadImaged(keys=KEYS, reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys=KEYS),
    ]
    if task == "spine-vertebrae":
        chain.append(
            MapLabelValued(
                keys="label",
                orig_labels=list(SPINE_VERSE_VALUES),
                target_labels=list(range(1, len(SPINE_VERSE_VALUES) + 1)),
            )
        )
    chain += [
        Spacingd(keys=KEYS, pixdim=tuple(float(s) for s in spacing), mode=("bilinear", "nearest")),
        ScaleIntensityRanged(
            keys="image", a_min=float(window[0]), a_max=float(window[1]), b_min=0.0, b_max=1.0, clip=True
        ),
    ]
    if compact:
        chain += [EnsureTyped(keys="image", dtype=np.float16, track_meta=False),
                  EnsureTyped(keys="label", dtype=np.uint8, track_meta=False)]
        # centre candidates per sampling class, cached with the volume (no per-step search of the label)
        if pad_to is not None:  # before the indices, which are flat offsets into the padded volume
            chain.append(SpatialPadd(keys=KEYS, spatial_size=tuple(int(r) for r in pad_to)))
        if task == "lung-nodule":
            chain.append(NoduleSamplingMapd(keys="image", window=window))
        chain += [
            ClassesToIndicesd(keys=SAMPLING_KEY if task == "lung-nodule" else "label",
                              num_classes=sampling_classes(task), max_samples_per_class=MAX_SAMPLES_PER_CLASS,
                              indices_postfix="_cls_indices"),
        ]
        if task == "lung-nodule":
            chain.append(DeleteItemsd(keys=SAMPLING_KEY))
    else:
        chain.append(EnsureTyped(keys=KEYS, dtype=np.float32, track_meta=False))
    return chain


def augment_transforms(task: str, roi: Sequence[int], num_samples: int, pos: float, neg: float,
                       insert_nodules: float = 0.0, window: Sequence[float] = (-1000.0, 400.0),
                       spacing: Sequence[float] = (1.5, 1.5, 1.5)) -> list:
    """Random part: label-aware patch sampling plus geometric and intensity augmentation.

    `insert_nodules` is the probability that a lung patch gets one extra synthetic nodule
    (`training.nodule_insertion.RandInsertNoduled`; `window` and `spacing` describe the patch).

    Nodules are flipped along every axis and rotated in the axial plane. Vertebrae are only flipped
    left-right (a cranio-caudal flip would swap the levels the network must tell apart) and rotated by
    small angles.
    """
    roi = tuple(int(r) for r in roi)
    chain: list = [
        RandCropByLabelClassesd(
            keys=KEYS, label_key="label", spatial_size=crop_size(roi), ratios=sampling_ratios(task, pos, neg),
            num_classes=sampling_classes(task), num_samples=num_samples, indices_key=INDICES_KEY if task ==
            "lung-nodule" else "label_cls_indices", allow_smaller=True, warn=False,
        ),
        RandSpatialCropd(keys=KEYS, roi_size=roi, random_size=False),
    ]
    if task == "lung-nodule":
        if insert_nodules > 0:
            chain.append(RandInsertNoduled(KEYS, window, spacing, prob=insert_nodules))
        chain += [
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=2),
            RandRotate90d(keys=KEYS, prob=0.5, spatial_axes=(1, 2)),
        ]
    else:
        chain += [
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=2),
            RandAffined(
                keys=KEYS, prob=0.3, rotate_range=(0.15, 0.05, 0.05), scale_range=(0.1, 0.1, 0.1),
                mode=("bilinear", "nearest"), padding_mode="border",
            ),
        ]
    chain += [
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
        RandGaussianNoised(keys="image", prob=0.2, std=0.01),
        EnsureTyped(keys=KEYS, dtype=np.float32, track_meta=False),
    ]
    return chain


def train_transforms(
    task: str, spacing: Sequence[float], window: Sequence[float], roi: Sequence[int],
    num_samples: int = 2, pos: float = 1.0, neg: float = 1.0,
) -> Compose:
    """Full training chain (load + augment), for uncached datasets."""
    return Compose(load_transforms(task, spacing, window, compact=True, pad_to=crop_size(roi))
                   + augment_transforms(task, roi, num_samples, pos, neg))


def val_transforms(task: str, spacing: Sequence[float], window: Sequence[float]) -> Compose:
    """Validation chain: the deterministic part only (whole volumes, evaluated by sliding window)."""
    return Compose(load_transforms(task, spacing, window))
