"""TID 1500 Comprehensive 3D SR: content read back with highdicom, and dciodvfy-clean."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage

from inference.encode import encode_seg, encode_sr
from inference.encode.naming import cranio_caudal
from inference.validation import dciodvfy_available, validate_output
from tests.inference.encode_fixtures import (
    SECOND_STAGE,
    SHA,
    build_ct_series,
    empty_result,
    nodule_card,
    nodule_result,
    shared_label_result,
    two_stage_result,
    vertebra_card,
    vertebra_result,
)

needs_dciodvfy = pytest.mark.skipif(not dciodvfy_available(), reason="dciodvfy (dicom3tools) not installed")


@pytest.fixture(scope="module")
def sources():
    return build_ct_series()


def _read_back(sr):
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.sr.srread(buffer)


def _measurement(group, concept):
    found = group.get_measurements(name=concept)
    assert len(found) == 1, concept
    return found[0]


def test_nodule_sr_lists_findings_with_location_and_measurements(sources):
    card = nodule_card()
    result = nodule_result(sources, card)
    sr = encode_sr(result, card, list(reversed(sources)), seg=None)

    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.PatientID == sources[0].PatientID and sr.PatientName == sources[0].PatientName
    assert sr.SeriesInstanceUID != sources[0].SeriesInstanceUID and sr.SeriesNumber == 9000
    assert "NOT FOR CLINICAL USE" in sr.SeriesDescription and card.name in sr.SeriesDescription
    assert sr.ContentDate and sr.ContentTime and sr.CompletionFlag == "COMPLETE"
    assert "PredecessorDocumentsSequence" not in sr

    back = _read_back(sr)
    assert isinstance(back, hd.sr.Comprehensive3DSR)
    groups = back.content.get_volumetric_roi_measurement_groups()
    ordered = cranio_caudal(result.findings)   # the report's order: superior first
    assert [str(g.tracking_uid) for g in groups] == [f.tracking_uid for f in ordered]
    for group, finding in zip(groups, ordered, strict=True):
        assert group.finding_type.value == "27925004"
        assert [site.value.value for site in group.finding_sites] == ["39607008"]
        assert group.reference_type == codes.DCM.VolumeSurface
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        np.testing.assert_allclose(group.roi.graphic_data[0], finding.centre_mm)
        assert group.roi.frame_of_reference_uid == sources[0].FrameOfReferenceUID
        diameter = _measurement(group, codes.SCT.Diameter)
        assert diameter.value == pytest.approx(finding.diameter_mm) and diameter.unit.value == "mm"
        volume = _measurement(group, codes.SCT.Volume)
        assert volume.value == pytest.approx(finding.volume_mm3) and volume.unit.value == "mm3"
        probability = _measurement(group, hd.sr.CodedConcept("DXG0001", "99DXGATE", "Detection probability"))
        assert probability.value == pytest.approx(finding.probability)


def test_sr_identifies_the_algorithm_and_the_images(sources):
    card = nodule_card()
    sr = encode_sr(nodule_result(sources, card), card, sources, seg=None)
    values = {str(e.value) for e in sr.iterall() if e.keyword in ("TextValue", "CodeMeaning", "UID")}
    assert {card.name, card.version, f"weights sha256={SHA}", f"dxgate {card.name}"} <= values
    assert {"Image Library", "Procedure reported", "Device Observer Name", "CT Chest"} <= values
    # every source image is in the evidence of the current request (PS3.3 C.17.2.3)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert {i.ReferencedSOPInstanceUID for i in evidence} == {s.SOPInstanceUID for s in sources}


def _texts(group) -> dict[str, list[str]]:
    """Concept name meaning -> the TEXT values under one measurement group (recursively)."""
    out: dict[str, list[str]] = {}
    for e in group[0].iterall():   # highdicom's group is a one-item Sequence of its content item
        if e.keyword == "ContentSequence":
            for child in e.value:
                if child.ValueType == "TEXT":
                    out.setdefault(child.ConceptNameCodeSequence[0].CodeMeaning, []).append(child.TextValue)
    return out


def test_each_finding_names_the_stage_that_found_it(sources):
    card = nodule_card()
    result = two_stage_result(sources, card)
    groups = _read_back(encode_sr(result, card, sources, seg=None)).content.get_volumetric_roi_measurement_groups()
    by_uid = {str(g.tracking_uid): g for g in groups}
    first, second = (_texts(by_uid[f.tracking_uid]) for f in result.findings)
    assert first["Algorithm Name"] == [card.name] * 2       # the group and its probability measurement
    assert second["Algorithm Name"] == [SECOND_STAGE.name] * 2
    assert second["Algorithm Version"] == [SECOND_STAGE.version] * 2
    assert f"weights sha256={SECOND_STAGE.weights_sha256}" in second["Algorithm Parameters"]
    assert f"weights sha256={SHA}" not in second["Algorithm Parameters"]


def test_no_finding_sr_names_the_later_stages_that_ran_too(sources):
    import dataclasses

    from inference.findings import algorithm_of

    card = nodule_card()
    result = dataclasses.replace(empty_result(sources, card), algorithms=[algorithm_of(card), SECOND_STAGE])
    (group,) = _read_back(encode_sr(result, card, sources, seg=None)).content.get_image_measurement_groups()
    params = _texts(group)["Algorithm Parameters"]
    assert params == [f"weights sha256={SHA}", f"second stage {SECOND_STAGE.name} {SECOND_STAGE.version} "
                                                f"weights sha256={SECOND_STAGE.weights_sha256}"]


@pytest.mark.parametrize("build", [nodule_result, shared_label_result])
def test_sr_references_the_seg_segment_of_each_finding(sources, build):
    card = nodule_card()
    result = build(sources, card)
    seg = encode_seg(result, card, sources)
    sr = encode_sr(result, card, sources, seg=seg)
    groups = _read_back(sr).content.get_volumetric_roi_measurement_groups()
    tracking = {str(d.TrackingUID): int(d.SegmentNumber) for d in seg.SegmentSequence}
    for group, finding in zip(groups, cranio_caudal(result.findings), strict=True):
        assert group.reference_type == codes.DCM.ReferencedSegment
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [tracking[finding.tracking_uid]]
    evidence = {
        s.SeriesInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    }
    assert seg.SeriesInstanceUID in evidence


def test_vertebra_sr_uses_vertebra_codes_and_centroids(sources):
    card = vertebra_card()
    result = vertebra_result(sources, card)
    groups = _read_back(encode_sr(result, card, sources, seg=None)).content.get_volumetric_roi_measurement_groups()
    # superior first: on this synthetic grid L2 lies above L1
    assert [(g.finding_type.value, g.finding_type.meaning) for g in groups] == [
        ("14293000", "Second lumbar vertebra"),
        ("66794005", "First lumbar vertebra"),
    ]
    assert [g.finding_category.value for g in groups] == ["91723000", "91723000"]
    for group, finding in zip(groups, cranio_caudal(result.findings), strict=True):
        np.testing.assert_allclose(group.roi.graphic_data[0], finding.centre_mm)
        assert group.tracking_identifier == finding.label   # a vertebra level keeps its name: "L1", not "L1 1"


def test_no_finding_sr_says_so(sources):
    card = nodule_card()
    sr = encode_sr(empty_result(sources, card), card, sources, seg=None)
    content = _read_back(sr).content
    assert content.get_volumetric_roi_measurement_groups() == []
    (group,) = content.get_image_measurement_groups()
    assert group.tracking_identifier == "No finding detected"
    answers = {(e.name.value, e.value.value) for e in group.get_qualitative_evaluations()}
    assert ("27925004", "272519000") in answers  # Nodule: Absent


def test_superseding_sr_lists_predecessors(sources):
    card = nodule_card()
    old = encode_sr(nodule_result(sources, card), card, sources, seg=None)
    new = encode_sr(
        nodule_result(sources, card), card, sources, seg=None, instance_number=2,
        supersedes=[(old.StudyInstanceUID, old.SeriesInstanceUID, old.SOPInstanceUID)],
    )
    (study,) = new.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == old.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == old.SeriesInstanceUID
    (sop,) = series.ReferencedSOPSequence
    assert (sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID) == (Comprehensive3DSRStorage, old.SOPInstanceUID)
    assert new.SOPInstanceUID != old.SOPInstanceUID and new.InstanceNumber == 2


@needs_dciodvfy
@pytest.mark.parametrize("kind", ["nodules", "nodules+seg", "two-stage+seg", "vertebrae", "empty", "superseding"])
def test_sr_passes_dciodvfy_and_round_trip(sources, kind):
    card = vertebra_card() if kind == "vertebrae" else nodule_card()
    if kind == "vertebrae":
        result = vertebra_result(sources, card)
    elif kind == "empty":
        result = empty_result(sources, card)
    elif kind.startswith("two-stage"):
        result = two_stage_result(sources, card)
    else:
        result = nodule_result(sources, card)
    seg = encode_seg(result, card, sources) if kind.endswith("+seg") else None
    supersedes = [(sources[0].StudyInstanceUID, "1.2.3.4", "1.2.3.4.5")] if kind == "superseding" else ()
    report = validate_output(encode_sr(result, card, sources, seg=seg, supersedes=supersedes))
    assert report.ok and report.errors == []
