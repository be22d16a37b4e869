"""MONAI transform chains that reproduce the inference preprocessing (CONTRACTS.md "Model contract").

Arrays stay in the source axis order [Z, Y, X] (slices sorted along the normal, rows, columns): the
volumes are written as NIfTI with a diagonal affine diag(sz, sy, sx), so `Spacingd` resamples axis 0 to
spacing_mm[0] and so on, exactly like `inference.preprocess.preprocess(volume, card)` (linear resampling
to card.input.spacing_mm, then HU window -> [0, 1], clipped). No reorientation is applied, because the
inference side applies none beyond slice sorting.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapLabelValued,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

KEYS = ("image", "label")

# VerSe label values (C1=1 .. L5=24, sacrum=26) -> output channels 1..25 (the spine model has 26 channels).
SPINE_LEVELS: tuple[str, ...] = (
    *(f"C{i}" for i in range(1, 8)),
    *(f"T{i}" for i in range(1, 13)),
    *(f"L{i}" for i in range(1, 6)),
    "Sacrum",
)
SPINE_VERSE_VALUES: tuple[int, ...] = (*range(1, 25), 26)


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


def load_transforms(task: str, spacing: Sequence[float], window: Sequence[float], compact: bool = False) -> list:
    """Deterministic part (cacheable): load, channel first, label remap, resample, window.

    `compact` keeps the cached image as float16 and the label as uint8 (a quarter of the memory);
    `augment_transforms` converts both back to float32.
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
    else:
        chain.append(EnsureTyped(keys=KEYS, dtype=np.float32, track_meta=False))
    return chain


def augment_transforms(task: str, roi: Sequence[int], num_samples: int, pos: float, neg: float) -> list:
    """Random part: label-aware patch sampling plus geometric and intensity augmentation.

    Nodules are flipped along every axis and rotated in the axial plane. Vertebrae are only flipped
    left-right (a cranio-caudal flip would swap the levels the network must tell apart) and rotated by
    small angles.
    """
    roi = tuple(int(r) for r in roi)
    chain: list = [
        SpatialPadd(keys=KEYS, spatial_size=roi),
        RandCropByPosNegLabeld(
            keys=KEYS, label_key="label", spatial_size=roi, pos=pos, neg=neg, num_samples=num_samples,
            image_key="image", image_threshold=0.0, allow_smaller=True,
        ),
    ]
    if task == "lung-nodule":
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
    return Compose(load_transforms(task, spacing, window) + augment_transforms(task, roi, num_samples, pos, neg))


def val_transforms(task: str, spacing: Sequence[float], window: Sequence[float]) -> Compose:
    """Validation chain: the deterministic part only (whole volumes, evaluated by sliding window)."""
    return Compose(load_transforms(task, spacing, window))
