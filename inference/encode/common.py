"""Helpers shared by the DICOM result encoders: codes, device identity, source ordering, geometry.

All outputs go into the *source* study (PS3.3 C.7.2.1 General Study Module copied from the source by
highdicom) as a new series whose description says the object is not for clinical use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from inference.errors import EncodeError
from inference.findings import Algorithm, Code, Finding, InferenceResult, algorithm_of
from inference.model_card import LabelSpec, ModelCard

MANUFACTURER = "dxgate project"
SOFTWARE_NAME = "dxgate"
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"

# Private coding scheme of this project (PS3.3 8.2: designators starting with "99" are private).
DXGATE_SCHEME = "99DXGATE"
DETECTION_PROBABILITY = hd.sr.CodedConcept("DXG0001", DXGATE_SCHEME, "Detection probability")
UNIT_MM = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
UNIT_MM3 = hd.sr.CodedConcept("mm3", "UCUM", "cubic millimeter")
UNIT_RATIO = hd.sr.CodedConcept("{ratio}", "UCUM", "ratio")



def private_coding_schemes() -> list[CodingSchemeIdentificationItem]:
    """Coding Scheme Identification Sequence item for the private scheme (PS3.3 C.12.1.1.5)."""
    return [
        CodingSchemeIdentificationItem(
            designator=DXGATE_SCHEME, name="dxgate private codes", responsible_organization=MANUFACTURER
        )
    ]


# Display windows (center, width) in HU for overlays; PS3.3 C.11.2.1.2.
LUNG_WINDOW = (-600.0, 1500.0)
BONE_WINDOW = (400.0, 1800.0)


def coded(code: Code | object) -> hd.sr.CodedConcept:
    """A `findings.Code` or a model-card `CodeModel` as a highdicom coded concept (PS3.3 8.8)."""
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)  # type: ignore[attr-defined]


def window_for(card: ModelCard) -> tuple[float, float]:
    """Display window (center, width): lung window for nodules, bone window for vertebrae."""
    return LUNG_WINDOW if card.postprocess == "nodules" else BONE_WINDOW


def series_description(card: ModelCard, kind: str) -> str:
    """`dxgate <model> v<version> <kind> NOT FOR CLINICAL USE`, cut to the 64 characters of LO."""
    tail = f" {kind} {NOT_FOR_CLINICAL_USE}"
    head = f"{SOFTWARE_NAME} {card.name} v{card.version}"
    return head[: 64 - len(tail)] + tail


def device_uid(card: ModelCard) -> str:
    """A stable UID for the algorithm as an SR device observer (same model+version -> same UID)."""
    return generate_uid(entropy_srcs=[SOFTWARE_NAME, card.name, card.version])


ORDINALS = ("first", "second", "third", "fourth", "fifth")


def stage_name(position: int) -> str:
    """`second stage` for position 1 of a composition (`InferenceResult.algorithms`), and so on."""
    return f"{ORDINALS[position]} stage" if position < len(ORDINALS) else f"stage {position + 1}"


def contributing_stages(result: InferenceResult, card: ModelCard) -> list[tuple[int, Algorithm]]:
    """(position, provenance) of each later stage of the composition that produced one of the findings."""
    own = algorithm_of(card)
    used = {f.algorithm for f in result.findings if f.algorithm is not None and f.algorithm != own}
    return [(i, a) for i, a in enumerate(result.algorithms) if i and a in used]


def algorithm_identification(card: ModelCard, stages: Sequence[tuple[int, Algorithm]] = ()
                             ) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence (PS3.3 C.8.20.2 / 10.16) of the model, with its weights hash, and the
    later `stages` of its composition (`contributing_stages`) whose findings share the model's segments."""
    parameters = {"weights_sha256": card.weights_sha256}
    for position, a in stages:
        key = stage_name(position).replace(" ", "_")
        parameters |= {key: f"{a.name} {a.version}", f"{key}_weights_sha256": a.weights_sha256}
    return hd.AlgorithmIdentificationSequence(
        name=card.name,
        family=codes.DCM.ArtificialIntelligence,
        version=card.version,
        source=card.algorithm_manufacturer,
        parameters=parameters,
    )


def new_instance(card: ModelCard, series_number: int, instance_number: int) -> dict:
    """Identity of a new result instance in a new series (General Series / Equipment, PS3.3 C.7.3.1, C.7.5.1):
    keyword arguments shared by highdicom's SR, SEG and GSPS constructors."""
    return {
        "series_instance_uid": generate_uid(),
        "series_number": series_number,
        "sop_instance_uid": generate_uid(),
        "instance_number": instance_number,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": card.name[:64],
        "software_versions": software_versions(card),
        "device_serial_number": card.weights_sha256[:16],
    }


def software_versions(card: ModelCard) -> str:
    return f"{card.name} {card.version}"[:64]


def set_body_part(ds: pydicom.Dataset, source: pydicom.Dataset, card: ModelCard) -> None:
    """Body Part Examined (General Series, PS3.3 C.7.3.1) from the source, else the card's first body part.

    Laterality (Type 2C) is then correctly absent for the unpaired body parts the models read (CHEST,
    SPINE); without Body Part Examined dciodvfy cannot know that and reports Laterality missing.
    """
    body_part = str(source.get("BodyPartExamined", "") or (card.body_part[0] if card.body_part else ""))
    if body_part:
        ds.BodyPartExamined = body_part.upper()[:16]


def ordered_sources(result: InferenceResult, sources: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The source datasets in the order of `result.source_sop_instance_uids` (the label-map slice order)."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    missing = [uid for uid in result.source_sop_instance_uids if uid not in by_uid]
    if missing:
        raise EncodeError(f"{len(missing)} source instance(s) of the result not given, e.g. {missing[0]}")
    ordered = [by_uid[uid] for uid in result.source_sop_instance_uids]
    if len({str(ds.StudyInstanceUID) for ds in ordered}) != 1:
        raise EncodeError("source instances belong to more than one study")
    return ordered


def label_spec_for(card: ModelCard, finding: Finding) -> LabelSpec:
    """The card label of a finding: by name, then by finding code, then the card's only label."""
    for spec in card.labels:
        if spec.name == finding.label:
            return spec
    for spec in card.labels:
        if spec.finding.value == finding.finding_code.value and spec.finding.scheme == finding.finding_code.scheme:
            return spec
    if len(card.labels) == 1:
        return card.labels[0]
    raise EncodeError(f"finding label {finding.label!r} matches no label of model card {card.name!r}")


def nearest_source(finding: Finding, ordered: Sequence[pydicom.Dataset]) -> pydicom.Dataset:
    """The source slice the finding refers to, else the slice whose plane is closest to its centre."""
    if finding.referenced_sop_instance_uid:
        for ds in ordered:
            if ds.SOPInstanceUID == finding.referenced_sop_instance_uid:
                return ds
    centre = np.asarray(finding.centre_mm, dtype=float)

    def distance(ds: pydicom.Dataset) -> float:
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        return abs(float(np.dot(centre - np.asarray(ds.ImagePositionPatient, dtype=float), normal)))

    return min(ordered, key=distance)


def centre_pixel(finding: Finding, image: pydicom.Dataset) -> tuple[float, float]:
    """The finding centre projected onto `image` as zero-based (column, row) pixel indices.

    (0, 0) is the centre of the top-left pixel; add 0.5 for SCOORD / GSPS coordinates, whose origin is
    the top-left corner of that pixel (PS3.3 C.18.6.1.1, C.10.5.1.2).
    """
    transformer = hd.spatial.ReferenceToPixelTransformer(
        image_position=image.ImagePositionPatient,
        image_orientation=image.ImageOrientationPatient,
        pixel_spacing=image.PixelSpacing,
        round_output=False,
    )
    col, row, _ = transformer(np.asarray([finding.centre_mm], dtype=float))[0]
    return float(col), float(row)


def display_diameter_mm(finding: Finding, default_mm: float = 20.0) -> float:
    """Diameter used for drawing: measured, else from the volume (equivalent sphere), else a default."""
    if finding.diameter_mm:
        return float(finding.diameter_mm)
    if finding.volume_mm3:
        return float((6.0 * finding.volume_mm3 / math.pi) ** (1.0 / 3.0))
    return default_mm


def annotation_text(finding: Finding) -> str:
    """Short label for overlays: name, diameter and probability."""
    parts = [finding.display_name]
    if finding.diameter_mm:
        parts.append(f"{finding.diameter_mm:.1f} mm")
    parts.append(f"p={finding.probability:.2f}")
    return " ".join(parts)
