"""A DICOM image series as one float32 volume with its patient-space geometry.

Geometry follows the Image Plane Module (PS3.3 C.7.6.2): ImageOrientationPatient gives the patient (LPS)
direction of the rows (+x, increasing column index) and of the columns (+y, increasing row index);
the slice normal is their cross product; slices are sorted by ImagePositionPatient projected on the
normal. Slice spacing comes from those positions, never from SliceThickness (which is the width of the
reconstructed slab, not the distance between slices).

Affine convention (used everywhere in `inference`): a voxel index (z, y, x) maps to the patient point

    p(x, y, z) = origin + direction @ (x * sx, y * sy, z * sz)

where `direction` has as columns the unit patient vectors of the +x (column), +y (row) and +z (slice)
axes and (sz, sy, sx) = `spacing`. `origin` is the ImagePositionPatient of the first sorted slice,
i.e. the centre of voxel [0, 0, 0].
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, pixel_array

from inference.codestream import check_frame_size
from inference.errors import VolumeError, WrongModalityError
from inference.limits import DEFAULT_LIMITS, VolumeLimits
from inference.plausibility import check_finite, check_pixel_spacing, check_slice_spacing, rescale
from inference.redaction import redact

log = logging.getLogger(__name__)

_DEFER = "16 KB"            # pixel data is read later, slice by slice, straight into the volume
_ORIENT_TOL = 1e-4          # direction cosines
_SPACING_RTOL = 1e-3        # PixelSpacing between slices
_DUPLICATE_MM = 1e-3        # two slices closer than this along the normal are the same position
_GAP_FACTOR = 1.5           # a gap larger than 1.5x the median step means missing slices


@dataclass
class Volume:
    """HU (or modality-LUT) voxels [Z, Y, X] plus the geometry needed to map indices to patient mm."""

    voxels: np.ndarray                          # [Z, Y, X] HU: int16 when exact, else float32
    spacing: tuple[float, float, float]         # (z, y, x) mm
    origin: np.ndarray                          # (3,) patient x, y, z of voxel [0, 0, 0]
    direction: np.ndarray                       # (3, 3) columns: patient direction of +x, +y, +z
    sop_instance_uids: list[str]                # one per slice, in sorted order
    modality: str
    frame_of_reference_uid: str
    series_instance_uid: str = ""
    study_instance_uid: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.voxels.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def _scaled_direction(self) -> np.ndarray:
        """3x3 matrix taking (x, y, z) *indices* to a patient-space offset in mm."""
        sz, sy, sx = self.spacing
        return self.direction * np.array([sx, sy, sz])[None, :]

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix taking homogeneous (z, y, x, 1) indices to patient (x, y, z, 1) mm."""
        m = np.eye(4)
        m[:3, :3] = self._scaled_direction()[:, ::-1]
        m[:3, 3] = self.origin
        return m

    def index_to_patient(self, zyx: np.ndarray) -> np.ndarray:
        """Voxel indices (z, y, x), shape (3,) or (N, 3), possibly fractional -> patient (x, y, z) mm."""
        idx = np.asarray(zyx, dtype=np.float64)
        return self.origin + idx[..., ::-1] @ self._scaled_direction().T

    def patient_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Patient (x, y, z) mm, shape (3,) or (N, 3) -> fractional voxel indices (z, y, x)."""
        p = np.asarray(xyz, dtype=np.float64) - self.origin
        idx_xyz = p @ np.linalg.inv(self._scaled_direction()).T
        return idx_xyz[..., ::-1]


@dataclass
class _Header:
    path: Path
    ds: Dataset
    position: float  # along the slice normal


def _read_header(path: Path) -> Dataset:
    try:
        return dcmread(path, defer_size=_DEFER)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise VolumeError(f"{Path(path).name}: not a readable DICOM file ({redact(str(exc))})") from exc


def _floats(ds: Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    """`n` finite numbers of `keyword` (Image Plane Module, PS3.3 C.7.6.2), or a VolumeError naming it."""
    value = ds.get(keyword)
    if value is None or value == "":
        raise VolumeError(f"{path.name}: {keyword} missing (PS3.3 C.7.6.2); every slice of a volume needs it")
    items = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        numbers = [float(v) for v in items]
    except (TypeError, ValueError):
        raise VolumeError(f"{path.name}: {keyword} is not a list of numbers (PS3.3 C.7.6.2)") from None
    if len(numbers) != n:
        raise VolumeError(f"{path.name}: {keyword} has {len(numbers)} values, expected {n} (PS3.3 C.7.6.2)")
    check_finite(numbers, keyword, path.name)
    return np.asarray(numbers, dtype=np.float64)


def _check_same(headers: list[_Header], keyword: str) -> str:
    values = {str(h.ds.get(keyword, "")) for h in headers}
    if len(values) > 1:
        raise VolumeError(f"mixed series: {len(values)} different {keyword} values in one volume")
    return values.pop()


def _check_modality(modality: str, expected: Sequence[str] | None) -> None:
    if expected is not None and modality not in set(expected):
        raise WrongModalityError(f"series modality {modality or '<empty>'!r} is not one of {sorted(expected)}")


def _read_headers(paths: Sequence[Path]) -> list[Dataset]:
    if len(paths) == 0:
        raise VolumeError("no files given")
    return [_read_header(Path(p)) for p in paths]


def _validate_geometry(
    datasets: list[Dataset], paths: Sequence[Path]
) -> tuple[list[_Header], np.ndarray, np.ndarray, tuple[float, float]]:
    """Check that all slices share one grid; return headers sorted along the normal."""
    first = datasets[0]
    row_col = _floats(first, "ImageOrientationPatient", 6, Path(paths[0]))
    pixel_spacing = _floats(first, "PixelSpacing", 2, Path(paths[0]))
    check_pixel_spacing((float(pixel_spacing[0]), float(pixel_spacing[1])), Path(paths[0]).name)
    rows, cols = int(first.get("Rows", 0)), int(first.get("Columns", 0))
    normal = np.cross(row_col[:3], row_col[3:])
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise VolumeError("ImageOrientationPatient row and column cosines are not orthonormal")
    headers: list[_Header] = []
    for ds, p in zip(datasets, paths, strict=True):
        path = Path(p)
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise VolumeError(f"{path.name}: no pixel data")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise VolumeError(f"{path.name}: multi-frame images are not supported; send single-frame slices")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise VolumeError(f"{path.name}: only monochrome images (SamplesPerPixel 1) form a volume")
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != (rows, cols):
            raise VolumeError(f"mixed series: {path.name} is {ds.get('Rows')}x{ds.get('Columns')}, "
                              f"expected {rows}x{cols}")
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, path), row_col, atol=_ORIENT_TOL):
            raise VolumeError(f"mixed series: {path.name} has a different ImageOrientationPatient")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, path), pixel_spacing, rtol=_SPACING_RTOL):
            raise VolumeError(f"mixed series: {path.name} has a different PixelSpacing")
        ipp = _floats(ds, "ImagePositionPatient", 3, path)
        headers.append(_Header(path, ds, float(ipp @ normal)))
    headers.sort(key=lambda h: h.position)
    return headers, row_col, normal, (float(pixel_spacing[0]), float(pixel_spacing[1]))


def _drop_repeats(headers: list[_Header]) -> list[_Header]:
    """The same instance stored twice is harmless; two different instances at one position are not."""
    kept: list[_Header] = [headers[0]]
    for h in headers[1:]:
        prev = kept[-1]
        if abs(h.position - prev.position) < _DUPLICATE_MM:
            if h.ds.get("SOPInstanceUID") == prev.ds.get("SOPInstanceUID"):
                log.info("dropping repeated instance %s", h.ds.get("SOPInstanceUID"))
                continue
            raise VolumeError(
                f"duplicate slice position {h.position:.3f} mm along the normal "
                f"(SOP Instance UIDs {prev.ds.get('SOPInstanceUID')} and {h.ds.get('SOPInstanceUID')})"
            )
        kept.append(h)
    return kept


def _slice_spacing(headers: list[_Header]) -> float:
    positions = np.array([h.position for h in headers])
    steps = np.diff(positions)
    median = float(np.median(steps))
    bad = np.flatnonzero((steps > _GAP_FACTOR * median) | (steps < median / _GAP_FACTOR))
    if bad.size:
        i = int(bad[0])
        raise VolumeError(
            f"irregular slice spacing: {steps[i]:.3f} mm between sorted slices {i} and {i + 1} "
            f"(median {median:.3f} mm); missing or extra slices?"
        )
    check_slice_spacing(median)
    return median


def _check_not_sheared(headers: list[_Header], normal: np.ndarray, pixel: tuple[float, float]) -> None:
    first = _floats(headers[0].ds, "ImagePositionPatient", 3, headers[0].path)
    last = _floats(headers[-1].ds, "ImagePositionPatient", 3, headers[-1].path)
    step = last - first
    drift = np.linalg.norm(step - (step @ normal) * normal)
    if drift > 0.5 * min(pixel):
        raise VolumeError(f"slices drift {drift:.2f} mm in-plane (gantry tilt?); sheared volumes are not supported")


_INT16 = np.iinfo(np.int16)


def _integral_rescale(h: _Header) -> bool:
    """True when HU = stored * slope + intercept stays integral (slope, intercept whole numbers; no LUT)."""
    if "ModalityLUTSequence" in h.ds:
        return False
    slope, intercept = rescale(h.ds, h.path.name)
    return slope.is_integer() and intercept.is_integer()


def _decode_hu(h: _Header) -> np.ndarray:
    """HU of one slice (PS3.3 C.11.1 Modality LUT / C.7.6.16.2.9 rescale): int32 when exact, else float32."""
    check_frame_size(h.path, str(h.ds.file_meta.get("TransferSyntaxUID", "")))   # a decoder allocates what it declares
    try:
        raw = pixel_array(h.path)
    except Exception as exc:  # decoder plugins raise many types (RuntimeError, ValueError, ...)
        raise VolumeError(f"{h.path.name}: pixel data cannot be decoded "
                          f"({type(exc).__name__}: {redact(str(exc))})") from exc
    if "ModalityLUTSequence" in h.ds:
        return np.asarray(apply_modality_lut(raw, h.ds), dtype=np.float32)
    slope, intercept = rescale(h.ds, h.path.name)
    if _integral_rescale(h):
        return raw.astype(np.int32) * int(slope) + int(intercept)
    return raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def load_series(paths: Sequence[Path], expected_modality: Sequence[str] | None = None,
                limits: VolumeLimits = DEFAULT_LIMITS) -> Volume:
    """Read one single-frame image series into an HU volume (int16 when exact, else float32) sorted along
    the slice normal.

    Raises WrongModalityError when Modality is not in `expected_modality` and VolumeError for a series
    beyond `limits` (checked before any pixel is decoded), mixed series, missing, non-finite or implausible
    geometry or rescale, duplicate positions, irregular gaps, a single slice, or undecodable pixels.
    """
    limits.check_slices(len(paths))
    datasets = _read_headers(paths)
    limits.check_voxels(len(datasets), int(datasets[0].get("Rows", 0) or 0), int(datasets[0].get("Columns", 0) or 0))
    modality = _check_modality_all(datasets, expected_modality)
    if len(datasets) < 2:
        raise VolumeError("a volume needs at least 2 slices; got 1")
    headers, row_col, normal, pixel = _validate_geometry(datasets, paths)
    headers = _drop_repeats(headers)
    if len(headers) < 2:
        raise VolumeError("a volume needs at least 2 distinct slice positions; got 1")
    dz = _slice_spacing(headers)
    _check_not_sheared(headers, normal, pixel)
    series_uid = _check_same(headers, "SeriesInstanceUID")
    frame_uid = _check_same(headers, "FrameOfReferenceUID")
    study_uid = _check_same(headers, "StudyInstanceUID")

    rows, cols = int(headers[0].ds.Rows), int(headers[0].ds.Columns)
    # int16 HU when every slice maps exactly (the usual CT: 12-bit stored values, slope 1): half the memory
    exact = all(_integral_rescale(h) for h in headers)
    voxels = np.empty((len(headers), rows, cols), dtype=np.int16 if exact else np.float32)
    for i, h in enumerate(headers):
        hu = _decode_hu(h)
        if hu.shape != (rows, cols):
            raise VolumeError(f"{h.path.name}: decoded shape {hu.shape} differs from {(rows, cols)}")
        if voxels.dtype == np.int16 and (int(hu.min()) < _INT16.min or int(hu.max()) > _INT16.max):
            voxels = voxels.astype(np.float32)   # rare: HU beyond int16 (e.g. 16-bit unsigned stored values)
        voxels[i] = hu
    direction = np.stack([row_col[:3], row_col[3:], normal], axis=1)
    origin = _floats(headers[0].ds, "ImagePositionPatient", 3, headers[0].path)
    log.info("loaded series %s: %d slices %dx%d, spacing %.3f/%.3f/%.3f mm",
             series_uid, len(headers), rows, cols, dz, pixel[0], pixel[1])
    return Volume(
        voxels=voxels,
        spacing=(dz, pixel[0], pixel[1]),
        origin=origin,
        direction=direction,
        sop_instance_uids=[str(h.ds.SOPInstanceUID) for h in headers],
        modality=modality,
        frame_of_reference_uid=frame_uid,
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
    )


def _check_modality_all(datasets: list[Dataset], expected: Sequence[str] | None) -> str:
    modalities = {str(ds.get("Modality", "")) for ds in datasets}
    if len(modalities) > 1:
        raise VolumeError(f"mixed series: modalities {sorted(modalities)}")
    modality = modalities.pop()
    _check_modality(modality, expected)
    return modality
