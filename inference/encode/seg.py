"""DICOM Segmentation (PS3.3 A.51) of the findings, on the source grid, built with highdicom.

One BINARY segment per finding present in the label map, numbered consecutively from 1 in order of
`Finding.label_index`, then cranio-caudally (`finding_segments`), labelled with the finding's name
(`naming.named`: "Lung nodule 2", "L1"). Each segment carries the card label's property category/type codes,
the finding site as anatomic region, algorithm type AUTOMATIC with the Algorithm Identification Sequence, and the
finding's Tracking UID/ID (PS3.3 C.8.20.4), so the SR's measurement group and the segment share one
tracking identity. For vertebrae (one finding per label) this is one segment per label present; for
nodules, which share one label value, it is one segment per nodule (the label's connected components, each
given to the nodule whose centre it holds) rather than one for all nodules, so that an SR ROI that references a
segment references exactly that nodule.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from scipy import ndimage

from inference.encode.common import (
    algorithm_identification,
    centre_pixel,
    coded,
    contributing_stages,
    display_diameter_mm,
    label_spec_for,
    nearest_source,
    new_instance,
    ordered_sources,
    series_description,
)
from inference.encode.naming import named
from inference.errors import EncodeError
from inference.findings import Algorithm, Finding, InferenceResult
from inference.model_card import ModelCard
from inference.redaction import redact

log = logging.getLogger(__name__)


def _voxel(finding: Finding, images: Sequence[pydicom.Dataset], shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The label-map voxel (slice, row, column) nearest the finding's centre."""
    image = nearest_source(finding, images)
    z = next(i for i, ds in enumerate(images) if ds is image)
    col, row = centre_pixel(finding, image)
    return z, int(np.clip(round(row), 0, shape[1] - 1)), int(np.clip(round(col), 0, shape[2] - 1))


def _component_of(components: np.ndarray, voxel: tuple[int, int, int], finding: Finding,
                  spacing: np.ndarray) -> int:
    """The component at the finding's centre voxel, else the one most of whose voxels lie within its radius."""
    at = int(components[voxel])
    if at:
        return at
    reach = np.maximum(1, np.ceil((display_diameter_mm(finding, 4.0) / 2.0) / spacing)).astype(int)
    box = tuple(slice(max(0, c - r), c + r + 1) for c, r in zip(voxel, reach, strict=True))
    values, counts = np.unique(components[box], return_counts=True)
    counts, values = counts[values > 0], values[values > 0]
    return int(values[np.argmax(counts)]) if len(values) else 0


def _spacing(images: Sequence[pydicom.Dataset]) -> np.ndarray:
    """(slice, row, column) spacing in mm of the ordered source grid."""
    row, col = (float(v) for v in images[0].PixelSpacing)
    if len(images) < 2:
        return np.asarray([float(getattr(images[0], "SliceThickness", 1.0) or 1.0), row, col])
    step = np.linalg.norm(np.subtract(images[1].ImagePositionPatient, images[0].ImagePositionPatient, dtype=float))
    return np.asarray([step or 1.0, row, col])


def finding_segments(result: InferenceResult, images: Sequence[pydicom.Dataset]) -> tuple[np.ndarray, list[Finding]]:
    """The label map relabelled so that every finding whose voxels it holds has a segment of its own.

    Returns the relabelled map (value k = segment k) and the findings of segments 1..N, in order of
    `label_index`, then as listed. A label value held by one finding is that finding's; one shared by several
    (every nodule has label_index 1) is split into its 26-connected components, each given to the finding whose
    centre lies in it (or, when no centre voxel does, within its radius); a component holding several centres is
    shared out by the nearest centre (in mm). Components of no finding are left out (logged by the caller).
    """
    label_map = np.asarray(result.label_map)
    present = set(np.unique(label_map).tolist()) - {0}
    spacing = _spacing(images)
    by_label: dict[int, list[Finding]] = {}
    for f in result.findings:
        if f.label_index in present:
            by_label.setdefault(f.label_index, []).append(f)
    owners: list[Finding] = []
    relabelled = np.zeros(label_map.shape, dtype=np.uint16)
    for index in sorted(by_label):
        findings = by_label[index]
        if len(findings) == 1:
            owners.append(findings[0])
            relabelled[label_map == index] = len(owners)
            continue
        components, _ = ndimage.label(label_map == index, structure=np.ones((3, 3, 3), dtype=bool))
        voxels = [_voxel(f, images, label_map.shape) for f in findings]
        held: dict[int, list[int]] = {}
        for k, (f, v) in enumerate(zip(findings, voxels, strict=True)):
            c = _component_of(components, v, f, spacing)
            if c:
                held.setdefault(c, []).append(k)
        number_of: dict[int, int] = {}
        for k in sorted(k for ks in held.values() for k in ks):
            owners.append(findings[k])
            number_of[k] = len(owners)
        boxes = ndimage.find_objects(components)
        for c, ks in held.items():
            box = boxes[c - 1]
            where = np.argwhere(components[box] == c) + np.asarray([b.start for b in box])
            if len(ks) == 1:
                relabelled[tuple(where.T)] = number_of[ks[0]]
                continue
            centres = np.asarray([voxels[k] for k in ks], dtype=float) * spacing
            nearest = np.argmin((((where * spacing)[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
            relabelled[tuple(where.T)] = np.asarray([number_of[k] for k in ks], dtype=np.uint16)[nearest]
    if len(owners) <= np.iinfo(np.uint8).max:
        relabelled = relabelled.astype(np.uint8)
    return relabelled, owners


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
    result = named(result, card)
    if label_map.shape[1:] != (int(images[0].Rows), int(images[0].Columns)):
        raise EncodeError(f"label map shape {label_map.shape} does not match the source image matrix")
    relabelled, owners = finding_segments(result, images)
    if not owners:
        return None
    dropped = int(np.count_nonzero(label_map) - np.count_nonzero(relabelled))
    if dropped:
        log.warning("seg: %d labelled voxels belong to no finding and are not encoded", dropped)
    stages = contributing_stages(result, card)
    descriptions = [_describe(f, number, card, stages) for number, f in enumerate(owners, start=1)]
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
        raise EncodeError(f"cannot build SEG: {redact(str(exc))}") from exc
    return seg


def _describe(finding: Finding, number: int, card: ModelCard, stages: Sequence[tuple[int, Algorithm]]
              ) -> hd.seg.SegmentDescription:
    spec = label_spec_for(card, finding)
    site = finding.site_code or spec.site
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=finding.display_name,
        segmented_property_category=coded(spec.category),
        segmented_property_type=coded(finding.finding_code),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(card, stages),
        tracking_uid=finding.tracking_uid,
        tracking_id=finding.display_name if finding.tracking_uid else None,
        anatomic_regions=[coded(site)] if site is not None else None,
    )
