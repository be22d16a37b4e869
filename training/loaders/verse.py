"""VerSe (MICCAI 2019/2020 vertebrae labelling) reader: NIfTI CT + NIfTI mask + centroid JSON.

Source of the format: the VerSe data README and `utils/data_utilities.py` in github.com/anjany/verse
(Sekuboyina et al., Med Image Anal 2021). Restructured release layout (BIDS-like):

    rawdata/sub-verse004/sub-verse004[_dir-orient]_ct.nii.gz
    derivatives/sub-verse004/sub-verse004[_dir-orient]_seg-vert_msk.nii.gz
    derivatives/sub-verse004/sub-verse004[_dir-orient]_seg-subreg_ctd.json

The centroid JSON is a list: first `{"direction": ["P", "I", "R"]}` (nibabel axis codes: the direction
in which each voxel axis *increases*), then `{"label": int, "X": .., "Y": .., "Z": ..}` per vertebra with
X, Y, Z continuous voxel indices of the image *reoriented to those axis codes* (entries containing NaN are
skipped, as the reference code does). Labels: 1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6, 26 sacrum,
27 coccyx, 28 T13.

We map a centroid to patient mm with the affine of the image reoriented to the JSON's axis codes
(nibabel `ornt_transform` + `inv_ornt_aff`), then RAS -> LPS (negate x and y) so the result is in the
DICOM patient system (PS3.3 C.7.6.2.1.1) used everywhere else in dxgate.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import nibabel.orientations as nio
import numpy as np

from training.errors import LoaderError

VERTEBRA_NAMES: dict[int, str] = {
    **{i: f"C{i}" for i in range(1, 8)},
    **{i + 7: f"T{i}" for i in range(1, 13)},
    **{i + 19: f"L{i}" for i in range(1, 7)},
    26: "S", 27: "Cocc", 28: "T13",
}
VERTEBRA_LABELS: dict[str, int] = {name: label for label, name in VERTEBRA_NAMES.items()}

_CTD_SUFFIX = re.compile(r"_seg-[a-z]+_ctd\.json$")


@dataclass(frozen=True)
class Centroid:
    label: int                                  # VerSe label (1..28)
    name: str                                   # "C1".."L6", "S" (sacrum), "Cocc", "T13"
    centre_mm: tuple[float, float, float]       # patient LPS mm


@dataclass(frozen=True)
class SpineCase:
    subject: str                                # e.g. "sub-verse004" (with "_dir-..." when present)
    image_path: Path
    mask_path: Path | None
    centroids_path: Path
    centroids: tuple[Centroid, ...]


def vertebra_name(label: int) -> str:
    try:
        return VERTEBRA_NAMES[int(label)]
    except KeyError as exc:
        raise LoaderError(f"unknown VerSe vertebra label {label}") from exc


def reoriented_affine(affine: np.ndarray, shape: Sequence[int], axcodes: Sequence[str]) -> np.ndarray:
    """Affine (voxel -> RAS mm) of the image after reorienting its array to `axcodes`."""
    ornt_from = nio.io_orientation(affine)
    ornt_to = nio.axcodes2ornt(tuple(axcodes))
    transform = nio.ornt_transform(ornt_from, ornt_to)
    return np.asarray(affine) @ nio.inv_ornt_aff(transform, tuple(shape[:3]))


def read_centroid_json(path: Path, affine: np.ndarray, shape: Sequence[int]) -> list[Centroid]:
    """Parse a VerSe centroid file and map every centroid to patient LPS mm (see module docstring)."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LoaderError(f"{path}: cannot read centroid JSON ({exc})") from exc
    if not isinstance(entries, list) or not entries or "direction" not in entries[0]:
        raise LoaderError(f"{path}: expected a list starting with {{'direction': [...]}}")
    axcodes = tuple(str(c) for c in entries[0]["direction"])
    if len(axcodes) != 3:
        raise LoaderError(f"{path}: direction must have three axis codes, got {axcodes}")
    try:
        to_ras = reoriented_affine(affine, shape, axcodes)
    except ValueError as exc:
        raise LoaderError(f"{path}: bad direction {axcodes} ({exc})") from exc
    out: list[Centroid] = []
    for entry in entries[1:]:
        try:
            label = int(entry["label"])
            ijk = np.array([float(entry["X"]), float(entry["Y"]), float(entry["Z"])])
        except (KeyError, TypeError, ValueError) as exc:
            raise LoaderError(f"{path}: bad centroid entry {entry}") from exc
        if any(math.isnan(v) for v in ijk):
            continue
        ras = to_ras[:3, :3] @ ijk + to_ras[:3, 3]
        out.append(Centroid(label, vertebra_name(label), (float(-ras[0]), float(-ras[1]), float(ras[2]))))
    return out


def _subject_key(name: str, suffix: str) -> str:
    return name[: -len(suffix)] if name.endswith(suffix) else name


def load_verse(root: Path) -> list[SpineCase]:
    """Every subject under `root` that has a centroid JSON and a CT (`*_ct.nii.gz` or `*_ct.nii`)."""
    root = Path(root)
    if not root.is_dir():
        raise LoaderError(f"{root}: not a directory")
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    for p in root.rglob("*.nii*"):
        for suffix, table in (("_ct.nii.gz", images), ("_ct.nii", images),
                              ("_seg-vert_msk.nii.gz", masks), ("_seg-vert_msk.nii", masks)):
            if p.name.endswith(suffix):
                table[_subject_key(p.name, suffix)] = p
    cases: list[SpineCase] = []
    for ctd in sorted(root.rglob("*_ctd.json")):
        key = _CTD_SUFFIX.sub("", ctd.name)
        image = images.get(key)
        if image is None:
            raise LoaderError(f"{ctd}: no matching CT {key}_ct.nii.gz under {root}")
        header = nib.load(str(image))
        centroids = read_centroid_json(ctd, header.affine, header.shape)
        cases.append(SpineCase(subject=key, image_path=image, mask_path=masks.get(key), centroids_path=ctd,
                               centroids=tuple(centroids)))
    if not cases:
        raise LoaderError(f"{root}: no VerSe centroid files (*_ctd.json) found")
    return cases
