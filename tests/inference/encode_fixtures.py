"""Builders for the encoder tests: a small synthetic CT series, model cards and inference results.

Everything is made in memory (no patient data): an axial CT series of `n` slices on a regular grid with
full Patient / General Study / Frame of Reference / CT Image modules (PS3.3 A.3), plus matching
`InferenceResult`s for nodules (sigmoid, one label) and vertebrae (softmax, one label per level).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from inference.findings import Algorithm, Code, Finding, InferenceResult
from inference.model_card import ModelCard

ROWS = COLS = 64
N_SLICES = 8
PIXEL_SPACING = (0.7, 0.7)  # (row spacing, column spacing) mm
SLICE_SPACING = 2.5
ORIGIN = (-22.4, -22.4, -100.0)  # ImagePositionPatient of slice 0 (x, y, z)
SHA = "ab" * 32

NODULE = Code("27925004", "SCT", "Nodule")
LUNG = Code("39607008", "SCT", "Lung")
L1 = Code("66794005", "SCT", "First lumbar vertebra")
L2 = Code("14293000", "SCT", "Second lumbar vertebra")


def build_ct_series(n_slices: int = N_SLICES) -> list[pydicom.Dataset]:
    """Return `n_slices` CT datasets (shuffled order is the caller's business) of one series."""
    study_uid, series_uid, for_uid = generate_uid(), generate_uid(), generate_uid()
    zz, yy, xx = np.mgrid[0:n_slices, 0:ROWS, 0:COLS]
    hu = np.full((n_slices, ROWS, COLS), -850, dtype=np.int16)  # lung parenchyma
    hu[((yy - 32) ** 2 + (xx - 32) ** 2) > 28**2] = 40  # soft tissue rim
    slices = []
    for i in range(n_slices):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        # Patient + General Study (synthetic, not a real person)
        ds.PatientName, ds.PatientID = "Synthetic^Phantom", "DXG-TEST-001"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, "20240102", "101500"
        ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", "ACC0001"
        ds.StudyDescription = "CT CHEST"
        # General Series / Frame of Reference / Equipment
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", series_uid, 2
        ds.SeriesDescription, ds.BodyPartExamined = "Thorax 2.5mm", "CHEST"
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = for_uid, ""
        ds.Manufacturer = "Synthetic"
        # General Image / Image Plane
        ds.InstanceNumber = i + 1
        ds.ContentDate, ds.ContentTime = "20240102", "101500"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], ORIGIN[2] + i * SLICE_SPACING]
        ds.SliceThickness, ds.SliceLocation = SLICE_SPACING, ORIGIN[2] + i * SLICE_SPACING
        # Image Pixel / CT Image
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = ROWS, COLS
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.KVP, ds.AcquisitionNumber = 120, 1
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = hu[i].tobytes()
        slices.append(ds)
    return slices


def voxel_to_mm(z: float, y: float, x: float) -> tuple[float, float, float]:
    """(slice, row, col) -> LPS mm for the grid of `build_ct_series` (axial, identity orientation)."""
    return (ORIGIN[0] + x * PIXEL_SPACING[1], ORIGIN[1] + y * PIXEL_SPACING[0], ORIGIN[2] + z * SLICE_SPACING)


def _card(task: str, postprocess: str, labels: list[dict]) -> ModelCard:
    return ModelCard.model_validate(
        {
            "name": f"test-{postprocess}",
            "version": "1.2.0",
            "task": task,
            "description": "synthetic test model",
            "modality": ["CT"],
            "body_part": ["CHEST" if postprocess == "nodules" else "SPINE"],
            "postprocess": postprocess,
            "input": {"spacing_mm": [2.5, 0.7, 0.7], "window": [-1000, 400], "roi_size": [8, 64, 64]},
            "output": {"activation": "sigmoid" if postprocess == "nodules" else "softmax",
                       "channels": 1 if postprocess == "nodules" else 1 + len(labels)},
            "labels": labels,
            "series": {"modalities": ["CT"]},
            "weights_sha256": SHA,
        }
    )


def _code(c: Code) -> dict:
    return {"value": c.value, "scheme": c.scheme, "meaning": c.meaning}


def nodule_card() -> ModelCard:
    return _card(
        "lung-nodule-detection",
        "nodules",
        [{"index": 1, "name": "Lung nodule", "finding": _code(NODULE),
          "category": {"value": "49755003", "scheme": "SCT", "meaning": "Morphologically abnormal structure"},
          "site": _code(LUNG)}],
    )


def vertebra_card() -> ModelCard:
    cat = {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical structure"}
    return _card(
        "vertebra-labelling",
        "vertebrae",
        [{"index": 1, "name": "L1", "finding": _code(L1), "category": cat},
         {"index": 2, "name": "L2", "finding": _code(L2), "category": cat}],
    )


def _ball(shape: tuple[int, int, int], centre_vox: tuple[int, int, int], radius_mm: float) -> np.ndarray:
    zz, yy, xx = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    d2 = (
        ((zz - centre_vox[0]) * SLICE_SPACING) ** 2
        + ((yy - centre_vox[1]) * PIXEL_SPACING[0]) ** 2
        + ((xx - centre_vox[2]) * PIXEL_SPACING[1]) ** 2
    )
    return d2 <= radius_mm**2


def _result(sources: list[pydicom.Dataset], objects: list[tuple], card: ModelCard) -> InferenceResult:
    """objects: (label_index, label, code, site, centre_vox, radius_mm, probability)."""
    shape = (len(sources), ROWS, COLS)
    label_map = np.zeros(shape, dtype=np.uint8)
    findings = []
    voxel_mm3 = SLICE_SPACING * PIXEL_SPACING[0] * PIXEL_SPACING[1]
    for index, label, code, site, centre, radius, prob in objects:
        mask = _ball(shape, centre, radius)
        label_map[mask] = index
        findings.append(
            Finding(
                label_index=index, label=label, finding_code=code, centre_mm=voxel_to_mm(*centre),
                probability=prob, diameter_mm=2 * radius, volume_mm3=float(mask.sum() * voxel_mm3),
                site_code=site, referenced_sop_instance_uid=sources[centre[0]].SOPInstanceUID,
                tracking_uid=generate_uid(),
            )
        )
    return InferenceResult(
        findings=findings, label_map=label_map, source_sop_instance_uids=[s.SOPInstanceUID for s in sources],
        model_name=card.name, model_version=card.version, weights_sha256=card.weights_sha256,
    )


def nodule_result(sources: list[pydicom.Dataset], card: ModelCard) -> InferenceResult:
    """Two nodules (label_index 1 and 2) of 8 mm and 6 mm."""
    return _result(
        sources,
        [(1, "Lung nodule", NODULE, LUNG, (3, 20, 22), 4.0, 0.91),
         (2, "Lung nodule", NODULE, LUNG, (5, 42, 40), 3.0, 0.74)],
        card,
    )


def shared_label_result(sources: list[pydicom.Dataset], card: ModelCard) -> InferenceResult:
    """Three nodules with label_index 1, as the nodule postprocessing makes them: one apart, two touching."""
    return _result(
        sources,
        [(1, "Lung nodule", NODULE, LUNG, (3, 20, 22), 4.0, 0.91),
         (1, "Lung nodule", NODULE, LUNG, (5, 42, 40), 3.0, 0.74),
         (1, "Lung nodule", NODULE, LUNG, (5, 42, 47), 3.0, 0.52)],
        card,
    )


SECOND_STAGE = Algorithm("test-candidates", "3", "cd" * 32)


def two_stage_result(sources: list[pydicom.Dataset], card: ModelCard) -> InferenceResult:
    """`nodule_result` with its second nodule added by a second stage (`SECOND_STAGE`)."""
    result = nodule_result(sources, card)
    first, second = result.findings
    return dataclasses.replace(result, findings=[first, dataclasses.replace(second, algorithm=SECOND_STAGE)],
                               model_version=f"{card.version}+{SECOND_STAGE.name}.{SECOND_STAGE.version}",
                               second_stage=SECOND_STAGE)


def vertebra_result(sources: list[pydicom.Dataset], card: ModelCard) -> InferenceResult:
    """Two vertebrae L1 (label 1) and L2 (label 2), with vertebra codes as finding types."""
    return _result(
        sources,
        [(1, "L1", L1, None, (2, 32, 32), 5.0, 0.97), (2, "L2", L2, None, (6, 32, 32), 5.0, 0.95)],
        card,
    )


def empty_result(sources: list[pydicom.Dataset], card: ModelCard) -> InferenceResult:
    return _result(sources, [], card)
