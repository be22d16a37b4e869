"""Write synthetic volumes as DICOM CT Image Storage series, plus LUNA16 / VerSe style ground truth.

One file per slice (`<out_dir>/CT<NNNN>.dcm`), modules per PS3.3 A.3 (CT Image IOD): Patient,
General Study, General Series, Frame of Reference, General Equipment, General Image, Image Plane
(C.7.6.2), Image Pixel (C.7.6.3), CT Image (C.8.2.1) and SOP Common. Every UID is derived from the
seed, so the same call writes byte-identical files. Geometry: axial, ImageOrientationPatient
[1,0,0,0,1,0] (rows along +x, columns along +y), slice k at z = origin_z + k * spacing_z.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from training.synthetic.chest_ct import generate_chest_ct
from training.synthetic.phantom import SyntheticVolume
from training.synthetic.spine_ct import generate_spine_ct

__all__ = ["SUPPORTED_TRANSFER_SYNTAXES", "SyntheticStudy", "ct_datasets", "truth_path", "write_chest_ct_study",
           "write_ct_series", "write_spine_ct_study"]

SUPPORTED_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless,
                               JPEGLSLossless)
_COMPRESSED = {RLELossless, JPEG2000Lossless, JPEGLSLossless}
_IMPLEMENTATION_UID = "1.2.826.0.1.3680043.8.498.1"  # pydicom's root; version name below identifies us
_RESCALE_INTERCEPT = -1024


@dataclass(frozen=True)
class SyntheticStudy:
    """A written synthetic study: UIDs, the slice files (in slice order), the volume and its ground truth."""

    study_uid: str
    series_uid: str
    files: list[Path]
    volume: SyntheticVolume
    annotations_path: Path


def _uid(seed: int, *parts: str) -> str:
    return generate_uid(entropy_srcs=["dxgate-synthetic", str(seed), *parts])


def _base_dataset(volume: SyntheticVolume, seed: int, study_uid: str, series_uid: str, patient_id: str,
                  series_description: str) -> Dataset:
    """Attributes shared by every slice of the series (Patient .. CT Image modules)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = f"{(seed % 10) + 8:02d}0000"
    ds.AccessionNumber = f"ACC{seed:08d}"[:16]
    ds.Modality = "CT"
    ds.Manufacturer = "dxgate synthetic"
    ds.InstitutionName = "dxgate synthetic"
    ds.ManufacturerModelName = "phantom"
    ds.SoftwareVersions = "dxgate-synthetic 1"
    ds.ReferringPhysicianName = "SYNTHETIC^REFERRER"
    ds.StationName = "SYNTH"
    ds.SeriesDescription = series_description[:64]
    ds.StudyDescription = f"Synthetic {volume.body_part.lower()} CT"
    ds.PatientName = f"SYNTHETIC^{volume.body_part}^{seed}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = f"{1940 + seed % 50:04d}0101"
    ds.PatientSex = "MF"[seed % 2]
    ds.PatientAge = f"{2024 - (1940 + seed % 50) - 1:03d}Y"
    ds.BodyPartExamined = volume.body_part
    ds.SliceThickness = f"{volume.spacing[0]:.6g}"
    ds.KVP = "120"
    ds.DataCollectionDiameter = f"{500:d}"
    ds.ReconstructionDiameter = f"{volume.spacing[2] * volume.hu.shape[2]:.6g}"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "200"
    ds.Exposure = "100"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "FFS" if volume.body_part == "SPINE" else "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{seed % 10**8}"
    ds.SeriesNumber = 1 if volume.body_part == "CHEST" else 2
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = _uid(seed, study_uid, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(volume.hu.shape[1]), int(volume.hu.shape[2])
    ds.PixelSpacing = [f"{volume.spacing[1]:.6g}", f"{volume.spacing[2]:.6g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = str(_RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "-600" if volume.body_part == "CHEST" else "400"
    ds.WindowWidth = "1500" if volume.body_part == "CHEST" else "1800"
    ds.BurnedInAnnotation = "NO"
    return ds


def ct_datasets(
    volume: SyntheticVolume,
    *,
    seed: int,
    series_description: str,
    study_uid: str | None = None,
    patient_id: str | None = None,
) -> list[Dataset]:
    """`volume` as one CT Image Storage data set per slice, in slice order, with its file meta.

    Uncompressed, Explicit VR Little Endian; stored pixel = HU - RescaleIntercept (-1024), int16.
    """
    study_uid = study_uid or _uid(seed, volume.body_part, "study")
    series_uid = _uid(seed, study_uid, series_description, "series")
    base = _base_dataset(volume, seed, study_uid, series_uid, patient_id or f"SYN{seed}", series_description)
    stored = (volume.hu.astype(np.int32) - _RESCALE_INTERCEPT).clip(-32768, 32767).astype(np.int16)
    ox, oy, oz = volume.origin
    dz = volume.spacing[0]
    datasets = []
    for k in range(volume.hu.shape[0]):
        ds = Dataset()
        ds.update(base)
        sop_uid = _uid(seed, series_uid, str(k))
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        z = oz + k * dz
        ds.ImagePositionPatient = [f"{ox:.6f}", f"{oy:.6f}", f"{z:.6f}"]
        ds.SliceLocation = f"{z:.6f}"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.ImplementationClassUID = _IMPLEMENTATION_UID
        ds.file_meta.ImplementationVersionName = "DXGATE_SYNTH"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        datasets.append(ds)
    return datasets


def write_ct_series(
    volume: SyntheticVolume,
    out_dir: Path,
    *,
    seed: int,
    series_description: str,
    transfer_syntax: str = ExplicitVRLittleEndian,
    study_uid: str | None = None,
    patient_id: str | None = None,
) -> list[Path]:
    """Write `volume` (see `ct_datasets`) as one file per slice, `<out_dir>/CT<NNNN>.dcm`, in slice order.

    Compressed transfer syntaxes (RLE Lossless, JPEG 2000 lossless, JPEG-LS lossless) use
    `Dataset.compress()` and need the matching encoder (pylibjpeg-rle / pylibjpeg-openjpeg / pyjpegls);
    a missing encoder raises RuntimeError.
    """
    if transfer_syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(f"unsupported transfer syntax {transfer_syntax}")
    if transfer_syntax in _COMPRESSED:
        _check_encoder(transfer_syntax)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(ct_datasets(volume, seed=seed, series_description=series_description,
                                       study_uid=study_uid, patient_id=patient_id)):
        if transfer_syntax in _COMPRESSED:
            ds.compress(transfer_syntax)
        else:
            ds.file_meta.TransferSyntaxUID = transfer_syntax
        path = out_dir / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _check_encoder(transfer_syntax: str) -> None:
    """Raise RuntimeError naming the missing packages when no encoder is installed for the syntax."""
    from pydicom.pixels import get_encoder
    from pydicom.uid import UID

    encoder = get_encoder(UID(transfer_syntax))
    if not encoder.is_available:
        raise RuntimeError(f"no encoder for {UID(transfer_syntax).name}: {encoder.missing_dependencies}")


def truth_path(out_dir: Path, name: str) -> Path:
    """Where a study folder's truth file goes: beside it, `chest/` -> `chest.annotations.csv`."""
    folder = out_dir if out_dir.name else out_dir.resolve()
    return folder.with_name(f"{folder.name}.{name}")


def write_chest_ct_study(
    out_dir: Path, *, seed: int = 0, slices: int = 100, nodules: int = 3, rows: int = 512, spacing=None,  # noqa: ANN001
) -> SyntheticStudy:
    """Generate a chest CT, write its DICOM series and `<out_dir>.annotations.csv` beside it (LUNA16 columns).

    annotations.csv: seriesuid,coordX,coordY,coordZ,diameter_mm — one row per nodule, coordinates are
    the nodule centre in patient LPS mm (the same frame as ImagePositionPatient). The truth file sits
    beside the folder, so the folder holds DICOM files only (dcmtk's `storescu --scan-directories`
    stops at any other file).
    """
    out_dir = Path(out_dir)
    volume = generate_chest_ct(seed, slices=slices, nodules=nodules, rows=rows, spacing=spacing)
    files = write_ct_series(volume, out_dir, seed=seed, series_description="Synthetic chest CT")
    study_uid = _uid(seed, volume.body_part, "study")
    series_uid = _uid(seed, study_uid, "Synthetic chest CT", "series")
    path = truth_path(out_dir, "annotations.csv")
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        for n in volume.nodules:
            writer.writerow([series_uid, *(f"{v:.3f}" for v in n.centre_mm), f"{n.diameter_mm:.3f}"])
    return SyntheticStudy(study_uid, series_uid, files, volume, path)


def write_spine_ct_study(
    out_dir: Path, *, seed: int = 0, slices: int = 120, rows: int = 512, spacing=None  # noqa: ANN001
) -> SyntheticStudy:
    """Generate a spine CT, write its DICOM series and VerSe-style `<out_dir>.centroids.json` beside it.

    centroids.json: `[{"direction": ["L", "P", "S"]}, {"label": 20, "X": .., "Y": .., "Z": ..}, ...]` with
    the VerSe label number and the centroid of that vertebra's voxels in patient LPS millimetres
    (X toward patient left, Y posterior, Z superior; the ImagePositionPatient frame, not voxel indices).
    """
    out_dir = Path(out_dir)
    volume = generate_spine_ct(seed, slices=slices, rows=rows, spacing=spacing)
    files = write_ct_series(volume, out_dir, seed=seed, series_description="Synthetic spine CT")
    study_uid = _uid(seed, volume.body_part, "study")
    series_uid = _uid(seed, study_uid, "Synthetic spine CT", "series")
    entries: list[dict] = [{"direction": ["L", "P", "S"]}]
    for v in volume.vertebrae:
        x, y, z = v.centroid_mm
        entries.append({"label": v.index, "X": round(x, 3), "Y": round(y, 3), "Z": round(z, 3)})
    path = truth_path(out_dir, "centroids.json")
    path.write_text(json.dumps(entries, indent=1))
    return SyntheticStudy(study_uid, series_uid, files, volume, path)
