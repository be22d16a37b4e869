"""Findings numbered uniquely in cranio-caudal order, the same name in SR, SEG and GSPS; each finding's image
SCOORD (TID 1410) on its centre slice; a superseding report keeps the Tracking UID of a finding found again."""

from __future__ import annotations

import dataclasses
import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from inference.encode import encode_gsps, encode_seg, encode_sr
from inference.encode.naming import carry_tracking_uids, cranio_caudal, earlier_findings, finding_names
from inference.validation import dciodvfy_available, validate_output
from tests.inference.encode_fixtures import (
    PIXEL_SPACING,
    build_ct_series,
    nodule_card,
    shared_label_result,
    vertebra_card,
    vertebra_result,
    voxel_to_mm,
)

# shared_label_result: nodules at (slice, row, col) (3, 20, 22), (5, 42, 40), (5, 42, 47); superior = higher slice
# so the report reads: (5, 42, 40) "Lung nodule 1", (5, 42, 47) "Lung nodule 2" (same z: smaller x first),
# (3, 20, 22) "Lung nodule 3".
CENTRES = [(5, 42, 40), (5, 42, 47), (3, 20, 22)]


@pytest.fixture(scope="module")
def sources():
    return build_ct_series()


def _bytes_round_trip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _expected_names(result) -> dict[str, str]:
    """Tracking UID -> expected name, from the fixture's voxel centres."""
    by_centre = {f.centre_mm: f.tracking_uid for f in result.findings}
    return {by_centre[voxel_to_mm(*c)]: f"Lung nodule {n}" for n, c in enumerate(CENTRES, start=1)}


def test_names_follow_cranio_caudal_order_ties_by_x_then_y(sources):
    card = nodule_card()
    result = shared_label_result(sources, card)
    expected = _expected_names(result)
    assert finding_names(result.findings, card) == [expected[f.tracking_uid] for f in result.findings]
    assert [f.centre_mm for f in cranio_caudal(result.findings)] == [voxel_to_mm(*c) for c in CENTRES]
    # ties in z and x are broken by y
    a, b, _ = result.findings
    same_x = [dataclasses.replace(a, centre_mm=(0.0, 5.0, 10.0)), dataclasses.replace(b, centre_mm=(0.0, 1.0, 10.0))]
    assert finding_names(same_x, card) == ["Lung nodule 2", "Lung nodule 1"]


def test_vertebra_levels_keep_their_names(sources):
    card = vertebra_card()
    result = vertebra_result(sources, card)
    assert finding_names(result.findings, card) == ["L1", "L2"]
    seg = _bytes_round_trip(encode_seg(result, card, sources))
    assert sorted(str(s.SegmentLabel) for s in seg.SegmentSequence) == ["L1", "L2"]


def test_the_same_unique_name_in_sr_seg_and_gsps(sources):
    card = nodule_card()
    result = shared_label_result(sources, card)
    expected = _expected_names(result)
    assert len(set(expected.values())) == 3
    seg = encode_seg(result, card, sources)
    sr = hd.sr.srread(io.BytesIO(_encoded(encode_sr(result, card, sources, seg=seg))))
    gsps = _bytes_round_trip(encode_gsps(result, card, sources))

    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    planar = sr.content.get_planar_roi_measurement_groups()
    for groups in (volumetric, planar):
        assert [g.tracking_identifier for g in groups] == ["Lung nodule 1", "Lung nodule 2", "Lung nodule 3"]
        assert {str(g.tracking_uid): g.tracking_identifier for g in groups} == expected
    segments = {str(s.TrackingUID): (str(s.SegmentLabel), str(s.TrackingID), int(s.SegmentNumber))
                for s in _bytes_round_trip(seg).SegmentSequence}
    assert {uid: label for uid, (label, _, _) in segments.items()} == expected
    assert {uid: tid for uid, (_, tid, _) in segments.items()} == expected
    # the segment numbers follow the names too
    assert {uid: f"Lung nodule {n}" for uid, (_, _, n) in segments.items()} == expected
    circles = {str(o.TrackingUID): str(o.TrackingID) for a in gsps.GraphicAnnotationSequence
               for o in a.GraphicObjectSequence}
    assert circles == expected
    texts = [str(t.UnformattedTextValue) for a in gsps.GraphicAnnotationSequence for t in a.TextObjectSequence]
    assert sorted(t.split(" ")[2] for t in texts) == ["1", "2", "3"]
    assert all(t.startswith("Lung nodule ") for t in texts)


def _encoded(ds: pydicom.Dataset) -> bytes:
    """The dataset as a DICOM file's bytes."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_each_finding_has_an_image_scoord_on_its_centre_slice(sources):
    card = nodule_card()
    result = shared_label_result(sources, card)
    seg = encode_seg(result, card, sources)
    sr = hd.sr.srread(io.BytesIO(_encoded(encode_sr(result, card, sources, seg=seg))))
    by_uid = {f.tracking_uid: f for f in result.findings}
    planar = sr.content.get_planar_roi_measurement_groups()
    assert len(planar) == 3
    for group, (z, row, col) in zip(planar, CENTRES, strict=True):
        finding = by_uid[str(group.tracking_uid)]
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.CIRCLE
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
            sources[z].SOPInstanceUID == finding.referenced_sop_instance_uid
        (cx, cy), (ex, ey) = region.value
        assert (cx, cy) == pytest.approx((col + 0.5, row + 0.5))   # centre of the centroid pixel, corner origin
        assert abs(ex - cx) == pytest.approx(finding.diameter_mm / 2 / PIXEL_SPACING[1]) and ey == cy
        (diameter,) = group.get_measurements(name=codes.SCT.Diameter)
        assert diameter.value == pytest.approx(finding.diameter_mm)
        assert group.finding_type.value == "27925004"
    # the volumetric groups keep the SEG reference and the volumetric measurements
    for group in sr.content.get_volumetric_roi_measurement_groups():
        assert group.reference_type == codes.DCM.ReferencedSegment
        assert len(group.get_measurements(name=codes.SCT.Volume)) == 1


def test_a_vertebra_without_diameter_gets_a_point(sources):
    card = vertebra_card()
    result = vertebra_result(sources, card)
    result = dataclasses.replace(result, findings=[dataclasses.replace(f, diameter_mm=None) for f in result.findings])
    sr = hd.sr.srread(io.BytesIO(_encoded(encode_sr(result, card, sources, seg=None))))
    planar = sr.content.get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in planar] == [f.label for f in cranio_caudal(result.findings)]
    for group in planar:
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POINT
        assert len(group.get_measurements(name=codes.SCT.Volume)) == 1


@pytest.mark.skipif(not dciodvfy_available(), reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("with_seg", [True, False])
def test_named_sr_with_scoords_passes_dciodvfy_and_round_trip(sources, with_seg):
    card = nodule_card()
    result = shared_label_result(sources, card)
    seg = encode_seg(result, card, sources) if with_seg else None
    report = validate_output(encode_sr(result, card, sources, seg=seg))
    assert report.ok and report.errors == []


def test_a_superseding_report_keeps_the_tracking_uid_of_a_finding_found_again(sources):
    card = nodule_card()
    old = shared_label_result(sources, card)
    old_sr = _bytes_round_trip(encode_sr(old, card, sources, seg=encode_seg(old, card, sources)))
    earlier = earlier_findings(old_sr, sources)
    assert {e.tracking_uid for e in earlier} == {f.tracking_uid for f in old.findings}
    for e in earlier:
        (f,) = [f for f in old.findings if f.tracking_uid == e.tracking_uid]
        np.testing.assert_allclose(e.centre_mm, f.centre_mm, atol=1e-6)
        assert e.label == "Lung nodule" and e.radius_mm == pytest.approx(f.diameter_mm / 2)

    # the re-run finds two of them again (moved by 1.5 mm), misses the third and finds one new far away
    again = [dataclasses.replace(f, tracking_uid=generate_uid(), centre_mm=(f.centre_mm[0] + 1.5, *f.centre_mm[1:]))
             for f in old.findings[:2]]
    new_one = dataclasses.replace(old.findings[2], tracking_uid=generate_uid(), centre_mm=(90.0, 90.0, -40.0))
    new = dataclasses.replace(old, findings=[*again, new_one])
    carried = carry_tracking_uids(new, earlier)
    assert [f.tracking_uid for f in carried.findings[:2]] == [f.tracking_uid for f in old.findings[:2]]
    assert carried.findings[2].tracking_uid == new_one.tracking_uid
    new_sr = hd.sr.srread(io.BytesIO(_encoded(encode_sr(carried, card, sources, seg=None))))
    uids = {str(g.tracking_uid) for g in new_sr.content.get_planar_roi_measurement_groups()}
    assert uids == {old.findings[0].tracking_uid, old.findings[1].tracking_uid, new_one.tracking_uid}


def test_another_label_or_a_far_finding_gets_no_earlier_uid(sources):
    card = nodule_card()
    old = shared_label_result(sources, card)
    earlier = earlier_findings(_bytes_round_trip(encode_sr(old, card, sources, seg=None)), sources)
    first = old.findings[0]
    other_label = dataclasses.replace(first, label="Mass", tracking_uid=generate_uid())
    far = dataclasses.replace(first, tracking_uid=generate_uid(),
                              centre_mm=(first.centre_mm[0] + 6.0, *first.centre_mm[1:]))   # > 5 mm and > radius
    carried = carry_tracking_uids(dataclasses.replace(old, findings=[other_label, far]), earlier)
    assert [f.tracking_uid for f in carried.findings] == [other_label.tracking_uid, far.tracking_uid]
