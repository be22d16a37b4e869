"""LUNA16 (LIDC-IDRI subset) reader: MetaImage `.mhd/.raw` scans plus the challenge CSV files.

Layout of the public release (Setio et al., Med Image Anal 2017, https://luna16.grand-challenge.org/Data/):

    subset0/ .. subset9/<seriesuid>.mhd + .raw
    annotations.csv            seriesuid,coordX,coordY,coordZ,diameter_mm       (nodules >= 3 mm, >= 3 readers)
    candidates.csv             seriesuid,coordX,coordY,coordZ,class            (optional; also candidates_V2.csv)
    annotations_excluded.csv   seriesuid,coordX,coordY,coordZ,diameter_mm      (optional "irrelevant findings",
                                                                                 evaluationScript/annotations/)

Coordinates are ITK world coordinates in mm, i.e. the patient LPS system used by DICOM (PS3.3 C.7.6.2.1.1).
A continuous voxel index (i, j, k) (ITK order: column, row, slice) maps to world as

    world = origin + direction @ (spacing * (i, j, k))

with `direction` the MetaImage `TransformMatrix` (columns = world direction of each index axis). Only the
header is read here (no voxels), so loading a full release is fast.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from training.errors import LoaderError

log = logging.getLogger(__name__)

_ANNOTATION_NAMES = ("annotations.csv",)
_CANDIDATE_NAMES = ("candidates_V2.csv", "candidates.csv")
_EXCLUDED_NAMES = ("annotations_excluded.csv",)


@dataclass(frozen=True)
class Nodule:
    """One annotated finding: centre in world (LPS) mm and diameter in mm."""

    centre_mm: tuple[float, float, float]
    diameter_mm: float


@dataclass(frozen=True)
class Candidate:
    """One line of candidates.csv: a location and whether it is a nodule (class 1) or not (class 0)."""

    centre_mm: tuple[float, float, float]
    is_nodule: bool


@dataclass(frozen=True)
class Case:
    """One LUNA16 scan: header geometry and its annotations."""

    series_uid: str
    image_path: Path
    size: tuple[int, int, int]                  # (i, j, k) voxels, ITK order
    spacing: tuple[float, float, float]         # (i, j, k) mm
    origin: tuple[float, float, float]          # world mm of voxel (0, 0, 0)
    direction: tuple[float, ...]                # 3x3 row-major; columns = world direction of i, j, k
    nodules: tuple[Nodule, ...] = ()
    excluded: tuple[Nodule, ...] = ()           # irrelevant findings, ignored by the FROC evaluation
    candidates: tuple[Candidate, ...] = ()
    subset: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def voxel_to_world(self, ijk: Sequence[float] | np.ndarray) -> np.ndarray:
        """Continuous ITK index (i, j, k) or an (N, 3) array of them -> world LPS mm."""
        return voxel_to_world(ijk, self.origin, self.spacing, self.direction_matrix)

    def world_to_voxel(self, xyz: Sequence[float] | np.ndarray) -> np.ndarray:
        """World LPS mm (or an (N, 3) array) -> continuous ITK index (i, j, k)."""
        return world_to_voxel(xyz, self.origin, self.spacing, self.direction_matrix)


def voxel_to_world(ijk: Sequence[float] | np.ndarray, origin: Sequence[float], spacing: Sequence[float],
                   direction: np.ndarray) -> np.ndarray:
    """world = origin + D @ (spacing * ijk); works for one point or rows of points."""
    idx = np.asarray(ijk, dtype=float)
    scaled = idx * np.asarray(spacing, dtype=float)
    return np.asarray(origin, dtype=float) + scaled @ np.asarray(direction, dtype=float).T


def world_to_voxel(xyz: Sequence[float] | np.ndarray, origin: Sequence[float], spacing: Sequence[float],
                   direction: np.ndarray) -> np.ndarray:
    """Inverse of `voxel_to_world`: ijk = D^-1 (world - origin) / spacing (D need not be orthonormal)."""
    rel = np.asarray(xyz, dtype=float) - np.asarray(origin, dtype=float)
    unscaled = np.linalg.solve(np.asarray(direction, dtype=float), rel.T).T
    return unscaled / np.asarray(spacing, dtype=float)


def _find_first(root: Path, names: Iterable[str]) -> Path | None:
    for name in names:
        direct = root / name
        if direct.is_file():
            return direct
        found = sorted(root.rglob(name))
        if found:
            return found[0]
    return None


def _read_rows(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise LoaderError(f"{path}: missing column(s) {missing}; header is {header}")
        reader.fieldnames = header
        return [row for row in reader if row.get("seriesuid")]


def _xyz(row: dict[str, str], path: Path, line: int) -> tuple[float, float, float]:
    try:
        return (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))
    except (TypeError, ValueError) as exc:
        raise LoaderError(f"{path}:{line}: bad coordinate in {row}") from exc


def read_nodule_csv(path: Path) -> dict[str, list[Nodule]]:
    """annotations.csv / annotations_excluded.csv -> {seriesuid: [Nodule]}.

    An empty or negative diameter (the excluded list has some) is kept as -1; the LUNA16 evaluation
    treats it as 10 mm when matching.
    """
    out: dict[str, list[Nodule]] = defaultdict(list)
    for line, row in enumerate(_read_rows(path, ("seriesuid", "coordX", "coordY", "coordZ")), start=2):
        raw = (row.get("diameter_mm") or "").strip()
        try:
            diameter = float(raw) if raw else -1.0
        except ValueError as exc:
            raise LoaderError(f"{path}:{line}: bad diameter_mm {raw!r}") from exc
        out[row["seriesuid"].strip()].append(Nodule(_xyz(row, path, line), diameter))
    return dict(out)


def read_candidates_csv(path: Path) -> dict[str, list[Candidate]]:
    """candidates.csv -> {seriesuid: [Candidate]}."""
    out: dict[str, list[Candidate]] = defaultdict(list)
    for line, row in enumerate(_read_rows(path, ("seriesuid", "coordX", "coordY", "coordZ", "class")),
                               start=2):
        out[row["seriesuid"].strip()].append(Candidate(_xyz(row, path, line), row["class"].strip() == "1"))
    return dict(out)


def read_mhd_header(path: Path) -> tuple[tuple[int, int, int], tuple[float, float, float],
                                          tuple[float, float, float], tuple[float, ...]]:
    """(size, spacing, origin, direction) of a MetaImage without reading its voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise LoaderError(f"{path}: not a readable MetaImage ({exc})") from exc
    if reader.GetDimension() != 3:
        raise LoaderError(f"{path}: expected a 3-D image, got {reader.GetDimension()}-D")
    sx, sy, sz = (int(v) for v in reader.GetSize())
    px, py, pz = (float(v) for v in reader.GetSpacing())
    ox, oy, oz = (float(v) for v in reader.GetOrigin())
    return (sx, sy, sz), (px, py, pz), (ox, oy, oz), tuple(float(v) for v in reader.GetDirection())


def load_luna16(root: Path, annotations: Path | None = None, candidates: Path | None = None,
                excluded: Path | None = None) -> list[Case]:
    """Every `.mhd` scan under `root` with its nodules, excluded findings and candidates.

    CSV files are looked up under `root` when not given. Scans are sorted by seriesuid. Annotations for
    series that are not on disk are logged (count only) and skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise LoaderError(f"{root}: not a directory")
    ann_path = annotations or _find_first(root, _ANNOTATION_NAMES)
    if ann_path is None:
        raise LoaderError(f"{root}: no annotations.csv found")
    nodules = read_nodule_csv(ann_path)
    exc_path = excluded or _find_first(root, _EXCLUDED_NAMES)
    excl = read_nodule_csv(exc_path) if exc_path else {}
    cand_path = candidates or _find_first(root, _CANDIDATE_NAMES)
    cands = read_candidates_csv(cand_path) if cand_path else {}

    cases: list[Case] = []
    for mhd in sorted(root.rglob("*.mhd"), key=lambda p: p.stem):
        size, spacing, origin, direction = read_mhd_header(mhd)
        uid = mhd.stem
        subset = mhd.parent.name if mhd.parent != root else None
        cases.append(Case(series_uid=uid, image_path=mhd, size=size, spacing=spacing,
                          origin=origin, direction=direction,
                          nodules=tuple(nodules.get(uid, ())), excluded=tuple(excl.get(uid, ())),
                          candidates=tuple(cands.get(uid, ())), subset=subset))
    seen = {c.series_uid for c in cases}
    orphans = sorted(set(nodules) - seen)
    if orphans:
        log.info("luna16: %d annotated series not on disk under %s (skipped)", len(orphans), root)
    if not cases:
        raise LoaderError(f"{root}: no .mhd scans found")
    return cases
