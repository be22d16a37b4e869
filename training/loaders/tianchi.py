"""Tianchi / Spark "spinal disease intelligent diagnosis" (脊柱疾病智能诊断) reader: MR DICOM + keypoint JSON.

Source of the format: the public dataset (tianchi.aliyun.com/dataset/79463) as read by the competition's
public baseline (`format_annotation` / `Evaluator` in the spinal_detection_baseline code) and by many
participants' loaders. Layout:

    lumbar_train150/study<N>/image<M>.dcm          several sagittal / axial MR series per study
    lumbar_train150_annotation.json

The JSON is a list, one item per study::

    {"studyUid": ..., "data": [{"seriesUid": ..., "instanceUid": ...,
      "annotation": [{"data": {"point": [
          {"coord": [x, y], "tag": {"identification": "L1", "vertebra": "v2"}, "zIndex": 5},
          {"coord": [x, y], "tag": {"identification": "L1-L2", "disc": "v1,v3"}, "zIndex": 5}, ...]}}]}]}

`coord` is (column, row) in pixels of the annotated instance (the middle T2 sagittal slice). Vertebrae
L1-L5 carry "v1" normal / "v2" degenerated; discs T12-L1 .. L5-S1 carry "v1" normal, "v2" bulge,
"v3" protrusion, "v4" extrusion, "v5" Schmorl's node, possibly several comma-separated. An empty class
is read as "v1", as the baseline does.

Pixel -> patient mm uses the Image Plane Module (PS3.3 C.7.6.2.1.1): P = IPP + c * dc * F_row + r * dr * F_col
with F_row / F_col the two ImageOrientationPatient vectors and (dr, dc) = PixelSpacing (row, column).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from training.errors import LoaderError

log = logging.getLogger(__name__)

VERTEBRA_TAGS = ("L1", "L2", "L3", "L4", "L5")
DISC_TAGS = ("T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
DISEASE_NAMES = {
    "vertebra": {"v1": "normal", "v2": "degeneration"},
    "disc": {"v1": "normal", "v2": "bulge", "v3": "protrusion", "v4": "extrusion", "v5": "Schmorl's node"},
}
_HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PixelSpacing",
                "ImagePositionPatient", "ImageOrientationPatient", "SeriesDescription"]


@dataclass(frozen=True)
class Keypoint:
    tag: str                                    # "L1".."L5" or "T12-L1".."L5-S1"
    kind: str                                   # "vertebra" | "disc"
    classes: tuple[str, ...]                    # ("v1",) .. ("v2", "v4")
    xy_px: tuple[float, float]                  # (column, row) on the annotated instance
    centre_mm: tuple[float, float, float] | None  # patient LPS mm (None without plane geometry)
    z_index: int | None = None


@dataclass(frozen=True)
class KeypointCase:
    study_uid: str
    series_uid: str
    instance_uid: str
    image_path: Path                            # the annotated instance
    series_paths: tuple[Path, ...]              # every instance of the annotated series, sorted by name
    pixel_spacing: tuple[float, float] | None   # (row, column) mm
    keypoints: tuple[Keypoint, ...]

    def keypoint(self, tag: str) -> Keypoint | None:
        return next((k for k in self.keypoints if k.tag == tag), None)


@dataclass(frozen=True)
class _Instance:
    path: Path
    series_uid: str
    pixel_spacing: tuple[float, float] | None
    position: np.ndarray | None
    orientation: np.ndarray | None


def pixel_to_patient(xy_px: tuple[float, float], position: np.ndarray, orientation: np.ndarray,
                     pixel_spacing: tuple[float, float]) -> tuple[float, float, float]:
    """(column, row) pixel -> patient LPS mm on one image plane (PS3.3 C.7.6.2.1.1)."""
    col, row = xy_px
    f_row, f_col = orientation[:3], orientation[3:]
    p = position + col * pixel_spacing[1] * f_row + row * pixel_spacing[0] * f_col
    return (float(p[0]), float(p[1]), float(p[2]))


def _index_dicom(root: Path) -> dict[tuple[str, str], _Instance]:
    """(StudyInstanceUID, SOPInstanceUID) -> header facts, for every readable DICOM file under root."""
    index: dict[tuple[str, str], _Instance] = {}
    for path in sorted(root.rglob("*.dcm")):
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except (InvalidDicomError, OSError) as exc:
            log.warning("tianchi: skipping unreadable %s (%s)", path.name, type(exc).__name__)
            continue
        if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds:
            continue
        spacing = (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])) if "PixelSpacing" in ds else None
        pos = np.array(ds.ImagePositionPatient, dtype=float) if "ImagePositionPatient" in ds else None
        ori = np.array(ds.ImageOrientationPatient, dtype=float) if "ImageOrientationPatient" in ds else None
        index[(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))] = _Instance(
            path, str(ds.get("SeriesInstanceUID", "")), spacing, pos, ori)
    return index


def _parse_point(point: dict[str, Any], where: str) -> tuple[str, str, tuple[str, ...], tuple[float, float],
                                                              int | None]:
    try:
        tag = point["tag"]
        ident = str(tag["identification"])
        x, y = (float(v) for v in point["coord"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LoaderError(f"{where}: bad point {point}") from exc
    kind = "disc" if "disc" in tag else "vertebra" if "vertebra" in tag else ("disc" if "-" in ident else
                                                                               "vertebra")
    raw = str(tag.get(kind, "") or "v1")
    classes = tuple(c.strip() for c in raw.split(",") if c.strip()) or ("v1",)
    z = point.get("zIndex")
    return ident, kind, classes, (x, y), int(z) if z is not None else None


def read_annotation_json(path: Path, index: dict[tuple[str, str], _Instance]) -> list[KeypointCase]:
    """One KeypointCase per study item of a Tianchi annotation file; studies not on disk are skipped."""
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LoaderError(f"{path}: cannot read annotation JSON ({exc})") from exc
    if not isinstance(items, list):
        raise LoaderError(f"{path}: expected a list of studies")
    by_series: dict[str, list[Path]] = {}
    for inst in index.values():
        by_series.setdefault(inst.series_uid, []).append(inst.path)
    cases: list[KeypointCase] = []
    missing = 0
    for n, item in enumerate(items):
        where = f"{path.name}[{n}]"
        try:
            study = str(item["studyUid"])
            data = item["data"][0]
            series, instance = str(data["seriesUid"]), str(data["instanceUid"])
            points = data["annotation"][0]["data"]["point"]
        except (KeyError, IndexError, TypeError) as exc:
            raise LoaderError(f"{where}: missing studyUid/data/annotation/point") from exc
        inst = index.get((study, instance))
        if inst is None:
            missing += 1
            continue
        keypoints = []
        for point in points:
            ident, kind, classes, xy, z = _parse_point(point, where)
            mm = None
            if inst.position is not None and inst.orientation is not None and inst.pixel_spacing:
                mm = pixel_to_patient(xy, inst.position, inst.orientation, inst.pixel_spacing)
            keypoints.append(Keypoint(ident, kind, classes, xy, mm, z))
        cases.append(KeypointCase(study, series, instance, inst.path, tuple(sorted(by_series.get(series, ()))),
                                  inst.pixel_spacing, tuple(keypoints)))
    if missing:
        log.info("tianchi: %d annotated studies of %s not found on disk (skipped)", missing, path.name)
    return cases


def load_tianchi(root: Path, annotation: Path | None = None) -> list[KeypointCase]:
    """Every annotated study under `root` (all `*annotation*.json` files there unless one is given)."""
    root = Path(root)
    if not root.is_dir():
        raise LoaderError(f"{root}: not a directory")
    files = [Path(annotation)] if annotation else sorted(root.rglob("*annotation*.json"))
    if not files:
        raise LoaderError(f"{root}: no *annotation*.json found")
    index = _index_dicom(root)
    cases = [c for f in files for c in read_annotation_json(f, index)]
    if not cases:
        raise LoaderError(f"{root}: no annotated study matched a DICOM file on disk")
    return cases
