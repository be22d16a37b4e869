"""DICOM Segmentation (PS3.3 A.51) of the findings, on the source grid, built with highdicom.

One BINARY segment per finding present in the label map, numbered consecutively from 1 in order of
`Finding.label_index`. Each segment carries the card label's property category/type codes, the finding
site as anatomic region, algorithm type AUTOMATIC with the Algorithm Identification Sequence, and the
finding's Tracking UID/ID (PS3.3 C.8.20.4), so the SR's measurement group and the segment share one
tracking identity. For vertebrae (one finding per label) this is one segment per label present; for
nodules it is one segment per nodule rather than one for all nodules, so that an SR ROI that references
a segment references exactly that nodule.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom

from inference.encode.common import (
    algorithm_identification,
    coded,
    label_spec_for,
    new_instance,
    ordered_sources,
    series_description,
)
from inference.errors import EncodeError
from inference.findings import Algorithm, Finding, InferenceResult
from inference.model_card import ModelCard

log = logging.getLogger(__name__)


def segment_numbers(result: InferenceResult) -> dict[int, int]:
    """label_index -> SEG segment number (1..N) for the findings whose label value is in the label map.

    `encode_sr` uses the same mapping to reference a finding's segment.
    """
    present = set(np.unique(result.label_map).tolist()) - {0}
    indices = sorted({f.label_index for f in result.findings if f.label_index in present})
    return {index: number for number, index in enumerate(indices, start=1)}


def encode_seg(
    result: InferenceResult,
    card: ModelCard,
    sources: Sequence[pydicom.Dataset],
    *,
    series_number: int = 9001,
    instance_number: int = 1,
) -> pydicom.Dataset | None:
    """Encode `result.label_map` as a BINARY Segmentation referencing the source images.

    Returns None when no finding's label value occurs in the label map: a SEG needs at least one
    segment with at least one non-empty frame, so an empty segmentation is not a valid object.
    Label-map values that belong to no finding (e.g. components below the reporting thresholds)
    are not encoded.
    """
    label_map = np.asarray(result.label_map)
    if label_map.ndim != 3 or label_map.shape[0] != len(result.source_sop_instance_uids):
        raise EncodeError(
            f"label map shape {label_map.shape} does not match {len(result.source_sop_instance_uids)} slices"
        )
    images = ordered_sources(result, sources)
    if label_map.shape[1:] != (int(images[0].Rows), int(images[0].Columns)):
        raise EncodeError(f"label map shape {label_map.shape} does not match the source image matrix")
    numbers = segment_numbers(result)
    if not numbers:
        return None
    findings = {f.label_index: f for f in result.findings}

    relabelled = np.zeros(label_map.shape, dtype=np.uint16 if len(numbers) > 255 else np.uint8)
    for index, number in numbers.items():
        relabelled[label_map == index] = number
    dropped = int(np.count_nonzero(label_map) - np.count_nonzero(relabelled))
    if dropped:
        log.warning("seg: %d labelled voxels belong to no finding and are not encoded", dropped)

    added = result.second_stage if any(f.algorithm for f in result.findings) else None
    descriptions = [_describe(findings[index], number, card, added) for index, number in numbers.items()]
    try:
        seg = hd.seg.Segmentation(
            source_images=images,
            pixel_array=relabelled,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            **new_instance(card, series_number, instance_number),
            content_label="DXGATE_SEG",
            content_description=f"{card.name} {card.version} findings. {card.intended_use}"[:64],
            series_description=series_description(card, "SEG"),
        )
    except (ValueError, TypeError) as exc:
        raise EncodeError(f"cannot build SEG: {exc}") from exc
    return seg


def _describe(finding: Finding, number: int, card: ModelCard, second_stage: Algorithm | None
              ) -> hd.seg.SegmentDescription:
    spec = label_spec_for(card, finding)
    site = finding.site_code or spec.site
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=f"{finding.label} {finding.label_index}" if card.postprocess == "nodules" else finding.label,
        segmented_property_category=coded(spec.category),
        segmented_property_type=coded(finding.finding_code),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(card, second_stage),
        tracking_uid=finding.tracking_uid,
        tracking_id=f"{finding.label} {finding.label_index}" if finding.tracking_uid else None,
        anatomic_regions=[coded(site)] if site is not None else None,
    )
