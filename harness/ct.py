"""Synthetic CT Image Storage series for tests and benchmarks (phantom data, no real patients).

One writer: every data set here comes from `training.synthetic.dicom_writer.ct_datasets` (the modules of
the CT Image IOD, PS3.3 A.3); this module only chooses the voxels, the geometry and the identifiers.

- `ct_slices(hu, ...)`: a series as in-memory data sets, any orientation, CT or MR, fresh UIDs.
- `make_ct` / `write_ct` / `write_ct_series`: small noise slices for the network tests.
- `write_series`: a series with a bright sphere, files in shuffled order (the volume and pipeline tests).
- `build_ct_series`: an in-memory 64x64 chest series on a fixed grid (the encoder tests).
- `write_chest_study`: a realistic chest CT (`training.synthetic`) at a fixed voxel size (benchmarks).
- `dataset_bytes` / `uids`: what C-STORE carries of a file; the SOP Instance UIDs of files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid

from training.synthetic import SyntheticVolume, write_chest_ct_study
from training.synthetic.dicom_writer import ct_datasets

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
ORIENTATIONS: dict[str, tuple[float, ...]] = {
    "axial": AXIAL,
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    "oblique": (1.0, 0.0, 0.0, 0.0, 0.7071068, -0.7071068),
}


def ct_slices(hu: np.ndarray, *, spacing: tuple[float, float, float], origin: tuple[float, float, float],
              orientation: Sequence[float] = AXIAL, modality: str = "CT", body_part: str = "CHEST",
              series_description: str = "Synthetic CT", study_uid: str | None = None, seed: int = 0,
              slice_thickness: float | None = None) -> list[Dataset]:
    """`hu` [Z, Y, X] as one data set per slice (slice order), Explicit VR Little Endian, with file meta.

    spacing is (between slices, row spacing, column spacing) mm; origin the ImagePositionPatient (x, y, z)
    of slice 0; slice k sits at origin + k * spacing[0] * normal (row x column direction). The study UID
    is fresh unless given, and every other UID derives from it. SliceThickness defaults to spacing[0].
    """
    volume = SyntheticVolume(hu=np.asarray(hu, dtype=np.float32), spacing=spacing, origin=origin,
                             label_map=np.zeros((0, 0, 0), dtype=np.uint8), body_part=body_part)
    datasets = ct_datasets(volume, seed=seed, series_description=series_description,
                           study_uid=study_uid or generate_uid())
    row, col = np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float)
    normal = np.cross(row, col)
    for k, ds in enumerate(datasets):
        if tuple(orientation) != AXIAL:
            ipp = np.asarray(origin, dtype=float) + k * spacing[0] * normal
            ds.ImageOrientationPatient = [float(v) for v in orientation]
            ds.ImagePositionPatient = [round(float(v), 4) for v in ipp]
            ds.SliceLocation = round(float(ipp @ normal), 4)
        if slice_thickness is not None:
            ds.SliceThickness = slice_thickness
        if modality != "CT":
            ds.Modality = modality
            if modality == "MR":
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    return datasets


def set_sop_instance_uid(ds: Dataset, uid: str) -> None:
    """Give a data set a new SOP Instance UID, in the data set and in its file meta."""
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid


def encode(ds: Dataset, transfer_syntax: str) -> Dataset:
    """Re-encode an uncompressed data set in `transfer_syntax` (pydicom's own encoders; in place)."""
    if UID(transfer_syntax) == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif UID(transfer_syntax).is_compressed:
        ds.compress(transfer_syntax)
    return ds


# -- small noise slices (network tests) ---------------------------------------------------------------
def make_ct(*, study_uid: str | None = None, series_uid: str | None = None, sop_uid: str | None = None,
            rows: int = 16, columns: int = 16, instance_number: int = 1, z_mm: float | None = None,
            pixel_spacing: tuple[float, float] = (0.7, 0.7), slice_thickness: float = 1.0,
            orientation: str = "axial", modality: str = "CT", body_part: str = "CHEST",
            series_description: str = "AXIAL 1.0 LUNG", series_number: int = 2,
            pixels: np.ndarray | None = None, transfer_syntax: str = ExplicitVRLittleEndian,
            seed: int = 0) -> Dataset:
    """One slice (HU = stored value - 1024; `pixels` are stored values) with a file meta header.

    Every call without given UIDs is a new study, series and instance.
    """
    if pixels is None:
        rng = np.random.default_rng(seed + instance_number)
        pixels = (rng.integers(0, 200, (rows, columns)) + 24).astype(np.int32)  # ~ air/lung HU
        pixels[rows // 4: 3 * rows // 4, columns // 4: 3 * columns // 4] += 1000  # soft tissue block
    z = float(instance_number - 1) * slice_thickness if z_mm is None else z_mm
    origin = (-0.5 * columns * pixel_spacing[1], -0.5 * rows * pixel_spacing[0], z)
    (ds,) = ct_slices(np.asarray(pixels, dtype=np.float32)[None] - 1024,
                      spacing=(slice_thickness, *pixel_spacing), origin=origin,
                      orientation=ORIENTATIONS[orientation], modality=modality, body_part=body_part,
                      series_description=series_description, study_uid=study_uid, seed=seed)
    set_sop_instance_uid(ds, sop_uid or generate_uid())
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber, ds.InstanceNumber = series_number, instance_number
    return encode(ds, transfer_syntax)


def write_ct(path: Path, **kwargs: object) -> Path:
    """Write one `make_ct` slice as a Part 10 file (PS3.10) and return its path."""
    ds = make_ct(**kwargs)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ct_series(folder: Path, n: int = 3, *, study_uid: str | None = None, series_uid: str | None = None,
                    **kwargs: object) -> list[Path]:
    """Write `n` contiguous `make_ct` slices of one series into `folder` (one file per SOP instance)."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    return [write_ct(folder / f"ct_{i:03d}.dcm", study_uid=study_uid, series_uid=series_uid, instance_number=i,
                     **kwargs) for i in range(1, n + 1)]


# -- a sphere in a box (volume and pipeline tests) ----------------------------------------------------
BACKGROUND_HU = -800
SPHERE_HU = 100


def write_series(
    folder: Path,
    *,
    shape: tuple[int, int, int] = (20, 40, 40),
    spacing: tuple[float, float, float] = (2.0, 1.5, 1.5),
    origin: tuple[float, float, float] = (-30.0, -30.0, 100.0),
    iop: Sequence[float] = AXIAL,
    sphere_mm: tuple[float, float, float] | None = (-6.0, 3.0, 118.0),
    radius_mm: float = 6.0,
    modality: str = "CT",
    skip: Sequence[int] = (),
    compress: bool = False,
    seed: int = 0,
) -> list[Path]:
    """Write a single-frame series as `<SOPInstanceUID>.dcm` files and return them in shuffled order.

    Slice k sits at origin + k * spacing[0] * normal; voxels within `radius_mm` of `sphere_mm` (patient
    x, y, z) are SPHERE_HU, the rest BACKGROUND_HU plus a little noise. Slices in `skip` are not written.
    SliceThickness (5 mm) is deliberately not the slice spacing.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    row, col = np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float)
    normal = np.cross(row, col)
    nz, ny, nx = shape
    sz, sy, sx = spacing
    jj, ii = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")  # row index, column index
    order = rng.permutation(nz)
    hu = np.empty(shape, dtype=np.float64)
    for k in order:
        if k in skip:  # not written, and draws no noise
            hu[k] = BACKGROUND_HU
            continue
        pts = (np.asarray(origin) + k * sz * normal)[None, None, :] + (ii[..., None] * sx) * row \
            + (jj[..., None] * sy) * col
        hu[k] = BACKGROUND_HU + rng.normal(0, 10, (ny, nx))
        if sphere_mm is not None:
            hu[k][np.linalg.norm(pts - np.asarray(sphere_mm), axis=-1) <= radius_mm] = SPHERE_HU
    datasets = ct_slices(np.round(hu), spacing=spacing, origin=origin, orientation=iop, modality=modality,
                         series_description="Synthetic sphere", seed=seed, slice_thickness=5.0)
    paths: list[Path] = []
    for k in order:
        if k in skip:
            continue
        ds = encode(datasets[k], RLELossless) if compress else datasets[k]
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# -- a fixed in-memory grid (encoder tests) -----------------------------------------------------------
ROWS = COLS = 64
N_SLICES = 8
PIXEL_SPACING = (0.7, 0.7)  # (row spacing, column spacing) mm
SLICE_SPACING = 2.5
ORIGIN = (-22.4, -22.4, -100.0)  # ImagePositionPatient of slice 0 (x, y, z)


def build_ct_series(n_slices: int = N_SLICES) -> list[pydicom.Dataset]:
    """`n_slices` axial CT data sets of one new series: lung parenchyma inside a soft-tissue rim."""
    _, yy, xx = np.mgrid[0:n_slices, 0:ROWS, 0:COLS]
    hu = np.full((n_slices, ROWS, COLS), -850, dtype=np.int16)
    hu[((yy - 32) ** 2 + (xx - 32) ** 2) > 28**2] = 40
    return ct_slices(hu, spacing=(SLICE_SPACING, *PIXEL_SPACING), origin=ORIGIN, series_description="Thorax 2.5mm")


# -- a realistic chest CT (benchmarks) ----------------------------------------------------------------
def write_chest_study(out_dir: Path, slices: int, rows: int, seed: int, slice_mm: float = 1.0,
                      fov_mm: float = 358.4) -> list[Path]:
    """A synthetic axial chest CT (`training.synthetic`) at `slice_mm` slices over a `fov_mm` field of view.

    One voxel size for every slice count, so costs compare per slice (the generator's own seeded spacing
    varies the model grid, and so the inference cost, by up to 4x). Returns the files in slice order.
    """
    px = fov_mm / rows
    study = write_chest_ct_study(out_dir, seed=seed, slices=slices, rows=rows, spacing=(slice_mm, px, px))
    return sorted(Path(f) for f in study.files)


# -- files --------------------------------------------------------------------------------------------
def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file, without preamble and file meta (what C-STORE carries)."""
    raw = path.read_bytes()
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    # Preamble (128) + "DICM" (4) + group 2, whose length is given by (0002,0000) (PS3.10 7.1).
    return raw[128 + 4 + 12 + int(meta.FileMetaInformationGroupLength):]


def uids(paths: Sequence[Path]) -> list[str]:
    """SOP Instance UIDs of files, in order."""
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
