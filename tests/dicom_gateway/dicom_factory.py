"""Small, valid CT Image Storage Part 10 files for tests (synthetic phantom data, no real patients).

`make_ct(...)` builds one slice as a pydicom Dataset (with file meta), `write_ct(path, ...)` writes it,
`write_ct_series(folder, n, ...)` writes a contiguous axial series. Compression uses pydicom's own
encoders (RLE Lossless always works; JPEG-LS / JPEG 2000 need the pyjpegls / pylibjpeg-openjpeg plugins).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

ORIENTATIONS: dict[str, tuple[float, ...]] = {
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    "oblique": (1.0, 0.0, 0.0, 0.0, 0.7071068, -0.7071068),
}


def make_ct(*, study_uid: str | None = None, series_uid: str | None = None, sop_uid: str | None = None,
            rows: int = 16, columns: int = 16, instance_number: int = 1, z_mm: float | None = None,
            pixel_spacing: tuple[float, float] = (0.7, 0.7), slice_thickness: float = 1.0,
            orientation: str = "axial", modality: str = "CT", body_part: str = "CHEST",
            series_description: str = "AXIAL 1.0 LUNG", series_number: int = 2,
            pixels: np.ndarray | None = None, transfer_syntax: str = ExplicitVRLittleEndian,
            seed: int = 0) -> Dataset:
    """One CT slice (HU = stored value - 1024) with a file meta header, ready for `save_as`."""
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = modality
    ds.Manufacturer = "dxgate tests"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = series_description
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = "SYNTH0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = body_part
    ds.SliceThickness = slice_thickness
    ds.KVP = 120
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    z = float(instance_number - 1) * slice_thickness if z_mm is None else z_mm
    ds.ImagePositionPatient = [-0.5 * columns * pixel_spacing[1], -0.5 * rows * pixel_spacing[0], z]
    ds.ImageOrientationPatient = list(ORIENTATIONS[orientation])
    ds.FrameOfReferenceUID = UID(ds.StudyInstanceUID + ".1") if len(ds.StudyInstanceUID) <= 62 else generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = z
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.PixelSpacing = list(pixel_spacing)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = -600, 1500
    if pixels is None:
        rng = np.random.default_rng(seed + instance_number)
        pixels = (rng.integers(0, 200, (rows, columns)) + 24).astype(np.uint16)  # ~ air/lung HU
        pixels[rows // 4: 3 * rows // 4, columns // 4: 3 * columns // 4] += 1000  # soft tissue block
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    if UID(transfer_syntax) == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif UID(transfer_syntax).is_compressed:
        ds.compress(transfer_syntax)
    return ds


def write_ct(path: Path, **kwargs: object) -> Path:
    """Write one CT slice as a Part 10 file (PS3.10) and return its path."""
    ds = make_ct(**kwargs)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ct_series(folder: Path, n: int = 3, *, study_uid: str | None = None, series_uid: str | None = None,
                    **kwargs: object) -> list[Path]:
    """Write `n` contiguous slices of one series into `folder` (one file per SOP instance)."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    return [write_ct(folder / f"ct_{i:03d}.dcm", study_uid=study_uid, series_uid=series_uid, instance_number=i,
                     **kwargs) for i in range(1, n + 1)]


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file, without preamble and file meta (what C-STORE carries)."""
    raw = path.read_bytes()
    meta_ds = pydicom.dcmread(path, stop_before_pixels=True)
    return raw[_data_set_offset(raw, meta_ds):]


def _data_set_offset(raw: bytes, ds: Dataset) -> int:
    # Preamble (128) + "DICM" (4) + group 2, whose length is given by (0002,0000) (PS3.10 7.1).
    group_length = int(ds.file_meta.FileMetaInformationGroupLength)
    return 128 + 4 + 12 + group_length


def uids(paths: Sequence[Path]) -> list[str]:
    """SOP Instance UIDs of files, in order."""
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
