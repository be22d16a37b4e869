"""Order and names of a report's findings, shared by the SR, SEG, GSPS and SC encoders.

Findings are numbered within a report in cranio-caudal order: highest patient z first (LPS, PS3.3
C.7.6.2.1.1: +z is superior), ties by x then y. A finding's name is its label plus its number among the
findings of that label ("Lung nodule 1", "Lung nodule 2", ...); a label that names one anatomical instance
(a vertebra level such as "L1", `postprocess == "vertebrae"`) is kept as it is when only one finding holds it.
The same name is the SR Tracking Identifier (PS3.16 TID 4108), the SEG Segment Label and Tracking ID (PS3.3
C.8.20.4) and the GSPS Tracking ID and text (PS3.3 C.10.5).

A superseding report keeps the Tracking UID of a finding it finds again (`carry_tracking_uids`): an earlier
finding of the same label whose centre lies within max(new radius, earlier radius, `MATCH_TOLERANCE_MM`) of
the new one's, read from the earlier SR's TID 1410 groups (`earlier_findings`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np
import pydicom

from inference.findings import Finding, InferenceResult
from inference.model_card import ModelCard

MATCH_TOLERANCE_MM = 5.0
# concept code values read back from an earlier SR (PS3.16 TID 1500, TID 1411, TID 300)
MEASUREMENT_GROUP = "125007"
TRACKING_UID = "112040"
TRACKING_ID = "112039"
DIAMETER = "81827009"
VOLUME = "118565006"


def cranio_caudal(findings: Sequence[Finding]) -> list[Finding]:
    """The findings superior first (highest patient z), ties by x then y."""
    return sorted(findings, key=lambda f: (-f.centre_mm[2], f.centre_mm[0], f.centre_mm[1]))


def finding_names(findings: Sequence[Finding], card: ModelCard) -> list[str]:
    """Name of each finding of `findings` (in the given order), numbered per label in cranio-caudal order."""
    per_label: dict[str, int] = {}
    for f in findings:
        per_label[f.label] = per_label.get(f.label, 0) + 1
    number: dict[int, int] = {}
    seen: dict[str, int] = {}
    for f in cranio_caudal(findings):
        seen[f.label] = seen.get(f.label, 0) + 1
        number[id(f)] = seen[f.label]
    keep_label = card.postprocess == "vertebrae"
    return [f.label if keep_label and per_label[f.label] == 1 else f"{f.label} {number[id(f)]}" for f in findings]


def named(result: InferenceResult, card: ModelCard) -> InferenceResult:
    """The result with its findings in cranio-caudal order, each with its `Finding.name`."""
    ordered = cranio_caudal(result.findings)
    findings = [dataclasses.replace(f, name=n) for f, n in zip(ordered, finding_names(ordered, card), strict=True)]
    return dataclasses.replace(result, findings=findings)


def _radius(diameter_mm: float | None, volume_mm3: float | None) -> float:
    """Radius of a finding from its diameter, else from its volume (equivalent sphere), else 0."""
    if diameter_mm:
        return float(diameter_mm) / 2.0
    if volume_mm3:
        return float((3.0 * volume_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0))
    return 0.0


@dataclasses.dataclass(frozen=True)
class EarlierFinding:
    """A finding of an earlier report, as `carry_tracking_uids` matches it."""

    tracking_uid: str
    label: str
    centre_mm: tuple[float, float, float]
    radius_mm: float


def _code_value(item: pydicom.Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else ""


def _groups(items: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Every Measurement Group container (DCM 125007) of an SR content tree."""
    found = []
    for item in items:
        if item.get("ValueType") == "CONTAINER" and _code_value(item) == MEASUREMENT_GROUP:
            found.append(item)
        elif "ContentSequence" in item:
            found.extend(_groups(item.ContentSequence))
    return found


def _scoord_centre(scoord: pydicom.Dataset, images: dict[str, pydicom.Dataset]
                   ) -> tuple[float, float, float] | None:
    """Patient position of the first point of an image SCOORD (a POINT, or a CIRCLE's centre) on a known image."""
    refs = scoord.ContentSequence[0].get("ReferencedSOPSequence", []) if "ContentSequence" in scoord else []
    image = images.get(str(refs[0].ReferencedSOPInstanceUID)) if refs else None
    if image is None:
        return None
    col, row = (float(v) - 0.5 for v in scoord.GraphicData[:2])  # SCOORD origin: the top-left pixel's corner
    iop = np.asarray(image.ImageOrientationPatient, dtype=float)
    spacing_row, spacing_col = (float(v) for v in image.PixelSpacing)
    # PS3.3 C.7.6.2.1.1: row direction cosines step along columns, column direction cosines along rows
    x, y, z = (np.asarray(image.ImagePositionPatient, dtype=float)
               + col * spacing_col * iop[:3] + row * spacing_row * iop[3:])
    return float(x), float(y), float(z)


def earlier_findings(sr: pydicom.Dataset, sources: Sequence[pydicom.Dataset]) -> list[EarlierFinding]:
    """The findings of an earlier dxgate SR (`encode_sr`) whose SCOORD lies on one of `sources`.

    From each measurement group with an image SCOORD (the TID 1410 group `encode_sr` writes per finding): the
    Tracking UID (DCM 112040), the label (the Tracking Identifier, DCM 112039, less its number), the centre (the
    SCOORD mapped to the patient frame), the radius (from Diameter SCT 81827009, else Volume SCT 118565006).
    """
    images = {str(ds.SOPInstanceUID): ds for ds in sources}
    found = []
    for group in _groups(sr.get("ContentSequence", [])):
        uid = name = None
        centre = None
        values: dict[str, float] = {}
        for item in group.get("ContentSequence", []):
            code = _code_value(item)
            if code == TRACKING_UID and item.get("ValueType") == "UIDREF":
                uid = str(item.UID)
            elif code == TRACKING_ID and item.get("ValueType") == "TEXT":
                name = str(item.TextValue)
            elif item.get("ValueType") == "NUM" and "MeasuredValueSequence" in item:
                values[code] = float(item.MeasuredValueSequence[0].NumericValue)
            elif item.get("ValueType") == "SCOORD":
                centre = centre or _scoord_centre(item, images)
        if uid and name and centre:
            label = re.sub(r" \d+$", "", name)
            found.append(EarlierFinding(uid, label, centre, _radius(values.get(DIAMETER), values.get(VOLUME))))
    return found


def carry_tracking_uids(result: InferenceResult, earlier: Sequence[EarlierFinding]) -> InferenceResult:
    """The result with each finding found again (same label, centres within the larger radius or
    `MATCH_TOLERANCE_MM`) given the earlier finding's Tracking UID; closest pairs first, each UID used once."""
    pairs = []
    for i, f in enumerate(result.findings):
        for j, e in enumerate(earlier):
            if e.label != f.label:
                continue
            distance = math.dist(f.centre_mm, e.centre_mm)
            if distance <= max(_radius(f.diameter_mm, f.volume_mm3), e.radius_mm, MATCH_TOLERANCE_MM):
                pairs.append((distance, i, j))
    taken_f: set[int] = set()
    taken_e: set[int] = set()
    uids: dict[int, str] = {}
    for _, i, j in sorted(pairs):
        if i in taken_f or j in taken_e or earlier[j].tracking_uid in uids.values():
            continue
        taken_f.add(i)
        taken_e.add(j)
        uids[i] = earlier[j].tracking_uid
    findings = [dataclasses.replace(f, tracking_uid=uids[i]) if i in uids else f
                for i, f in enumerate(result.findings)]
    return dataclasses.replace(result, findings=findings)


def carry_from_reports(result: InferenceResult, reports: Sequence[pydicom.Dataset],
                       sources: Sequence[pydicom.Dataset]) -> InferenceResult:
    """`carry_tracking_uids` from the findings of earlier SRs (newest first) this result's report supersedes."""
    earlier = [e for sr in reports for e in earlier_findings(sr, sources)]
    return carry_tracking_uids(result, earlier) if earlier else result
