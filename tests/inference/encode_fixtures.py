"""Builders for the encoder tests: model cards and inference results on the harness's CT grid.

Everything is made in memory (no patient data): `build_ct_series` (from `harness.ct`) is an axial CT
series of `n` slices on a regular grid; the `InferenceResult`s here match it, for nodules (sigmoid, one
label) and vertebrae (softmax, one label per level).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from harness.ct import COLS, ORIGIN, PIXEL_SPACING, ROWS, SLICE_SPACING, build_ct_series
from inference.findings import Algorithm, Code, Finding, InferenceResult, algorithm_of
from inference.model_card import ModelCard

__all__ = ["PIXEL_SPACING", "SECOND_STAGE", "SHA", "build_ct_series", "empty_result", "nodule_card", "nodule_result",
           "shared_label_result", "two_stage_result", "vertebra_card", "vertebra_result", "voxel_to_mm"]

SHA = "ab" * 32

NODULE = Code("27925004", "SCT", "Nodule")
LUNG = Code("39607008", "SCT", "Lung")
L1 = Code("66794005", "SCT", "First lumbar vertebra")
L2 = Code("14293000", "SCT", "Second lumbar vertebra")


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
    """`nodule_result` as a two-stage composition's: its first nodule from the model, its second added by a later
    stage (`SECOND_STAGE`), each finding carrying its provenance."""
    result = nodule_result(sources, card)
    first, second = result.findings
    own = algorithm_of(card)
    return dataclasses.replace(result, findings=[dataclasses.replace(first, algorithm=own),
                                                 dataclasses.replace(second, algorithm=SECOND_STAGE)],
                               model_version=f"{card.version}+{SECOND_STAGE.name}.{SECOND_STAGE.version}",
                               algorithms=[own, SECOND_STAGE])


def vertebra_result(sources: list[pydicom.Dataset], card: ModelCard) -> InferenceResult:
    """Two vertebrae L1 (label 1) and L2 (label 2), with vertebra codes as finding types."""
    return _result(
        sources,
        [(1, "L1", L1, None, (2, 32, 32), 5.0, 0.97), (2, "L2", L2, None, (6, 32, 32), 5.0, 0.95)],
        card,
    )


def empty_result(sources: list[pydicom.Dataset], card: ModelCard) -> InferenceResult:
    return _result(sources, [], card)
