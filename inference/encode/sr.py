"""TID 1500 Measurement Report as a Comprehensive 3D SR (PS3.3 A.35.13), built with highdicom.

Content tree (PS3.16 TID 1500):
- observation context: device observer (TID 1004) = the model, UID stable per model name + version;
- procedure reported: CT chest for the nodule model, else CT/MR of an unspecified body region (CID 100);
- image library (TID 1600) with every source image;
- one Volumetric ROI group (TID 1411) per finding: tracking identifier (UID = `Finding.tracking_uid`),
  finding type, category and site, named as `naming.named` names it ("Lung nodule 2", cranio-caudal order),
  algorithm identification (TID 4019: name, version, "weights sha256=<hex>" of
  the model whose stage produced the finding, `Finding.algorithm`),
  the ROI as the finding's SEG segment when a SEG is given (the SEG segment also carries the same
  Tracking UID), else a "Volume surface" SCOORD3D POINT at the centre in the source frame of reference
  (TID 1411 allows one of the two; highdicom enforces it), and measurements (TID 300): Diameter
  (SCT 81827009, mm), Volume (SCT 118565006, mm3) and the detection probability ({ratio}). No standard
  concept names a detector's confidence (DCM 111047 "Probability of cancer" would claim malignancy), so
  it is the private code 99DXGATE DXG0001 "Detection probability";
- after each, a Planar ROI group (TID 1410) of the same finding (same tracking identifier and UID): an Image
  Region SCOORD on the source slice through its centre, a CIRCLE of the diameter (else a POINT), with the
  Diameter (else the Volume). TID 1411 does not allow image coordinates next to a segment reference; viewers
  that list TID 1500 measurements only from SCOORD content (OHIF v3) draw this group;
- no finding: one TID 1501 group whose qualitative evaluations answer each card finding type with
  SCT 272519000 "Absent" (highdicom requires at least one measurement group).
A re-run that supersedes earlier reports lists them in the Predecessor Documents Sequence (C.17.2.1).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, generate_uid

from inference.encode.common import (
    DETECTION_PROBABILITY,
    SOFTWARE_NAME,
    UNIT_MM,
    UNIT_MM3,
    UNIT_RATIO,
    centre_pixel,
    coded,
    device_uid,
    label_spec_for,
    nearest_source,
    new_instance,
    ordered_sources,
    private_coding_schemes,
    series_description,
    stage_name,
)
from inference.encode.naming import named
from inference.errors import EncodeError
from inference.findings import Algorithm, Finding, InferenceResult, algorithm_of
from inference.model_card import ModelCard
from inference.redaction import redact

CT_CHEST = hd.sr.CodedConcept("24627-2", "LN", "CT Chest")
CT_UNSPECIFIED = hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region")
MR_UNSPECIFIED = hd.sr.CodedConcept("25056-3", "LN", "MR unspecified body region")
ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")


def procedure_code(card: ModelCard, modality: str) -> hd.sr.CodedConcept:
    """Procedure reported (CID 100) for the model and the source modality."""
    if modality == "MR":
        return MR_UNSPECIFIED
    return CT_CHEST if card.postprocess == "nodules" else CT_UNSPECIFIED


def algorithm_id(model: Algorithm, later: Sequence[Algorithm] = ()) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification with the weights hash as a parameter; the `later` stages of the model's
    composition that ran after it are named in further parameters (what all together did not find is reported
    absent)."""
    parameters = [f"weights sha256={model.weights_sha256}"]
    for position, a in enumerate(later, start=1):
        parameters.append(f"{stage_name(position)} {a.name} {a.version} weights sha256={a.weights_sha256}")
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version, parameters=parameters)


def finding_algorithm_id(finding: Finding, card: ModelCard) -> hd.sr.AlgorithmIdentification:
    """The algorithm that made `finding` (`Finding.algorithm`, the stage's model), else the card's model."""
    return algorithm_id(finding.algorithm or algorithm_of(card))


def tracking_identifier(finding: Finding) -> hd.sr.TrackingIdentifier:
    """TID 4108 Tracking Identifier: the finding's name in the report (`naming.named`) and its Tracking UID."""
    return hd.sr.TrackingIdentifier(uid=finding.tracking_uid or generate_uid(), identifier=finding.display_name)


def encode_sr(
    result: InferenceResult,
    card: ModelCard,
    sources: Sequence[pydicom.Dataset],
    *,
    seg: pydicom.Dataset | None,
    supersedes: Sequence[tuple[str, str, str]] = (),
    series_number: int = 9000,
    instance_number: int = 1,
) -> pydicom.Dataset:
    """Encode the findings as a TID 1500 Comprehensive 3D SR in the source study.

    `seg` is the segmentation made by `encode_seg` for the same result (or None); `supersedes` lists
    (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) of earlier dxgate SRs this one replaces.
    """
    images = ordered_sources(result, sources)
    result = named(result, card)
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ]
    try:
        if result.findings:
            numbers = segment_of(seg) if seg is not None else {}
            groups = []
            for f in result.findings:
                algo = finding_algorithm_id(f, card)
                groups.append(_finding_group(f, card, images, algo, seg, numbers.get(f.tracking_uid)))
                groups.append(_planar_group(f, card, images, algo))
        else:
            groups = [_no_finding_group(card, algorithm_id(algorithm_of(card), result.algorithms[1:]))]
        report = hd.sr.MeasurementReport(
            observation_context=_observation_context(card),
            procedure_reported=procedure_code(card, str(images[0].Modality)),
            imaging_measurements=groups,
            referenced_images=_library_images(result, images),
        )
        evidence = [*images, seg] if seg is not None else images
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            is_complete=True,
            series_description=series_description(card, "SR"),
            **new_instance(card, series_number, instance_number),
            coding_schemes=private_coding_schemes(),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodeError(f"cannot build SR: {redact(str(exc))}") from exc
    if supersedes:
        sr.PredecessorDocumentsSequence = predecessor_documents(supersedes)
    return sr


def segment_of(seg: pydicom.Dataset) -> dict[str | None, int]:
    """Tracking UID -> number of the SEG segment that holds that finding (`encode_seg` gives each its own)."""
    return {str(d.TrackingUID): int(d.SegmentNumber) for d in seg.SegmentSequence if "TrackingUID" in d}


def _library_images(result: InferenceResult, images: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The TID 1600 Image Library: the slices the findings point at, not the whole series.

    Every source instance is still listed as evidence (Current Requested Procedure Evidence Sequence,
    PS3.3 C.17.2); listing all of them in the content tree too made a 300-slice SR take ~16 s to build
    and read back, for no information a viewer uses.
    """
    wanted = {f.referenced_sop_instance_uid for f in result.findings if f.referenced_sop_instance_uid}
    chosen = [ds for ds in images if str(ds.SOPInstanceUID) in wanted]
    return chosen or list(images[:1])


def _observation_context(card: ModelCard) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(card),
        name=f"{SOFTWARE_NAME} {card.name}"[:64],
        manufacturer_name=card.algorithm_manufacturer,
        model_name=f"{card.name} {card.version}"[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _finding_group(
    finding: Finding,
    card: ModelCard,
    images: Sequence[pydicom.Dataset],
    algo: hd.sr.AlgorithmIdentification,
    seg: pydicom.Dataset | None,
    segment_number: int | None,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    spec = label_spec_for(card, finding)
    frame_of_reference = str(images[0].FrameOfReferenceUID)
    centre = np.asarray([finding.centre_mm], dtype=float)
    measurements = []
    if finding.diameter_mm is not None:
        measurements.append(hd.sr.Measurement(name=codes.SCT.Diameter, value=finding.diameter_mm, unit=UNIT_MM))
    if finding.volume_mm3 is not None:
        measurements.append(hd.sr.Measurement(name=codes.SCT.Volume, value=finding.volume_mm3, unit=UNIT_MM3))
    measurements.append(
        hd.sr.Measurement(
            name=DETECTION_PROBABILITY,
            value=float(finding.probability),
            unit=UNIT_RATIO,
            algorithm_id=algo,
        )
    )
    roi: dict = {}
    if seg is not None and segment_number is not None:
        roi["referenced_segment"] = referenced_segment(seg, segment_number, images)
    else:
        roi["referenced_volume_surface"] = hd.sr.VolumeSurface(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=centre,
            frame_of_reference_uid=frame_of_reference,
            source_series=hd.sr.SourceSeriesForSegmentation(str(images[0].SeriesInstanceUID)),
        )
    site = finding.site_code or spec.site
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking_identifier(finding),
        finding_type=coded(finding.finding_code),
        finding_category=coded(spec.category),
        finding_sites=[hd.sr.FindingSite(anatomic_location=coded(site))] if site is not None else None,
        algorithm_id=algo,
        measurements=measurements,
        **roi,
    )


def image_region(finding: Finding, image: pydicom.Dataset) -> hd.sr.ImageRegion:
    """Image Region SCOORD (TID 1410, PS3.3 C.18.6) on the slice through the finding's centre: a CIRCLE of the
    measured diameter (centre, then a point on the circle), else a POINT at the centre; pixel coordinates whose
    origin is the top-left corner of the top-left pixel (PS3.3 C.18.6.1.1)."""
    col, row = centre_pixel(finding, image)
    col, row = col + 0.5, row + 0.5
    source = hd.sr.SourceImageForRegion.from_source_image(image)
    if not finding.diameter_mm:
        return hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POINT, graphic_data=np.array([[col, row]]), source_image=source)
    radius = float(finding.diameter_mm) / 2.0 / float(image.PixelSpacing[1])
    edge = col + radius if col + radius <= float(image.Columns) else col - radius
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.CIRCLE, graphic_data=np.array([[col, row], [edge, row]]),
        source_image=source)


def _planar_group(finding: Finding, card: ModelCard, images: Sequence[pydicom.Dataset],
                  algo: hd.sr.AlgorithmIdentification) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of the same finding (same Tracking Identifier and UID): its `image_region` on the centre
    slice with the diameter (else the volume) inferred from it."""
    spec = label_spec_for(card, finding)
    site = finding.site_code or spec.site
    measurements = []
    if finding.diameter_mm is not None:
        measurements.append(hd.sr.Measurement(name=codes.SCT.Diameter, value=finding.diameter_mm, unit=UNIT_MM))
    elif finding.volume_mm3 is not None:
        measurements.append(hd.sr.Measurement(name=codes.SCT.Volume, value=finding.volume_mm3, unit=UNIT_MM3))
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking_identifier(finding),
        referenced_region=image_region(finding, nearest_source(finding, images)),
        finding_type=coded(finding.finding_code),
        finding_category=coded(spec.category),
        finding_sites=[hd.sr.FindingSite(anatomic_location=coded(site))] if site is not None else None,
        algorithm_id=algo,
        measurements=measurements or None,
    )


def referenced_segment(seg: pydicom.Dataset, segment_number: int,
                       images: Sequence[pydicom.Dataset]) -> hd.sr.ReferencedSegment:
    """TID 1411 reference to one SEG segment and the source images its frames derive from.

    highdicom's `ReferencedSegment.from_segmentation` reads Segment Identification from the per-frame
    functional groups only; a one-frame SEG keeps it in the shared groups (PS3.3 C.7.6.16), so the
    frames of the segment are found here in either place.
    """
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else None
    per_frame = seg.get("PerFrameFunctionalGroupsSequence", [])
    frames: list[int] = []
    sources: set[str] = set()
    for i, item in enumerate(per_frame, start=1):
        ident = item.get("SegmentIdentificationSequence") or (shared.get("SegmentIdentificationSequence")
                                                              if shared is not None else None)
        if ident and int(ident[0].ReferencedSegmentNumber) == segment_number:
            frames.append(i)
            for deriv in item.get("DerivationImageSequence", []):
                for src in deriv.get("SourceImageSequence", []):
                    sources.add(str(src.ReferencedSOPInstanceUID))
    by_uid = {str(ds.SOPInstanceUID): ds for ds in images}
    source_images = [hd.sr.SourceImageForSegmentation(str(by_uid[u].SOPClassUID), u) for u in sorted(sources)
                     if u in by_uid]
    kwargs: dict = {"source_images": source_images} if source_images else {
        "source_series": hd.sr.SourceSeriesForSegmentation(str(images[0].SeriesInstanceUID))}
    return hd.sr.ReferencedSegment(sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
                                   segment_number=segment_number, **kwargs)  # whole segment: no frame list


def _no_finding_group(
    card: ModelCard, algo: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group stating that none of the card's finding types was detected."""
    seen: dict[tuple[str, str], hd.sr.CodedConcept] = {}
    for spec in card.labels:
        seen.setdefault((spec.finding.value, spec.finding.scheme), coded(spec.finding))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="No finding detected"),
        finding_category=coded(card.labels[0].category),
        algorithm_id=algo,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=c, value=ABSENT) for c in seen.values()],
    )


def predecessor_documents(supersedes: Sequence[tuple[str, str, str]]) -> pydicom.Sequence:
    """Predecessor Documents Sequence (PS3.3 C.17.2.1, Hierarchical SOP Instance Reference Macro)."""
    tree: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for study_uid, series_uid, sop_uid in supersedes:
        tree[study_uid][series_uid].append(sop_uid)
    studies = []
    for study_uid, series in tree.items():
        study_item = pydicom.Dataset()
        study_item.StudyInstanceUID = study_uid
        series_items = []
        for series_uid, sops in series.items():
            series_item = pydicom.Dataset()
            series_item.SeriesInstanceUID = series_uid
            sop_items = []
            for sop_uid in sops:
                sop_item = pydicom.Dataset()
                sop_item.ReferencedSOPClassUID = Comprehensive3DSRStorage
                sop_item.ReferencedSOPInstanceUID = sop_uid
                sop_items.append(sop_item)
            series_item.ReferencedSOPSequence = sop_items
            series_items.append(series_item)
        study_item.ReferencedSeriesSequence = series_items
        studies.append(study_item)
    return pydicom.Sequence(studies)
