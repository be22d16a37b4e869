"""Binary DICOM SEG of the label map: segments, pixels and references read back with highdicom."""

from __future__ import annotations

import dataclasses
import io

import highdicom as hd
import numpy as np
import pytest
from pydicom.uid import SegmentationStorage
from scipy.ndimage import label as ndimage_label

from inference.encode import encode_seg
from inference.errors import EncodeError
from inference.validation import dciodvfy_available, validate_output
from tests.inference.encode_fixtures import (
    SECOND_STAGE,
    build_ct_series,
    empty_result,
    nodule_card,
    nodule_result,
    shared_label_result,
    two_stage_result,
    vertebra_card,
    vertebra_result,
)


@pytest.fixture(scope="module")
def sources():
    return build_ct_series()


def _read_back(seg):
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.seg.segread(buffer)


def _label_volume(seg, uids):
    return seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)


def test_nodule_seg_round_trips_the_label_map(sources):
    card = nodule_card()
    result = nodule_result(sources, card)
    seg = encode_seg(result, card, list(reversed(sources)))  # any order: matched by SOP Instance UID
    assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID and seg.PatientID == sources[0].PatientID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert "NOT FOR CLINICAL USE" in seg.SeriesDescription

    back = _read_back(seg)
    assert back.number_of_segments == 2
    assert set(back.get_source_image_uids()[i][2] for i in range(len(sources))) == {s.SOPInstanceUID for s in sources}
    labels = _label_volume(back, result.source_sop_instance_uids)
    np.testing.assert_array_equal(labels, result.label_map)
    # empty frames are omitted
    assert int(seg.NumberOfFrames) < 2 * len(sources)


def test_segment_descriptions_carry_codes_algorithm_and_tracking(sources):
    card = nodule_card()
    result = nodule_result(sources, card)
    back = _read_back(encode_seg(result, card, sources))
    for number, finding in enumerate(result.findings, start=1):
        desc = back.get_segment_description(number)
        assert desc.segmented_property_type.value == "27925004"
        assert desc.segmented_property_category.value == "49755003"
        assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algo = desc.algorithm_identification[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == (card.name, card.version)
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # DCM Artificial Intelligence
        assert desc.tracking_uid == finding.tracking_uid
        assert [r.value for r in desc.anatomic_regions] == ["39607008"]


def test_nodules_sharing_a_label_get_a_segment_each(sources):
    card = nodule_card()
    result = shared_label_result(sources, card)
    seg = encode_seg(result, card, sources)
    back = _read_back(seg)
    assert back.number_of_segments == 3
    number = {back.get_segment_description(n).tracking_uid: n for n in (1, 2, 3)}
    assert set(number) == {f.tracking_uid for f in result.findings}
    assert [back.get_segment_description(n).segment_label for n in (1, 2, 3)] == [f"Lung nodule {n}" for n in (1, 2, 3)]
    labels = _label_volume(back, result.source_sop_instance_uids)
    np.testing.assert_array_equal(labels > 0, result.label_map > 0)   # every nodule voxel, in one segment
    apart, left, right = result.findings
    _, y, x = np.mgrid[: labels.shape[0], : labels.shape[1], : labels.shape[2]]
    np.testing.assert_array_equal(labels == number[apart.tracking_uid], (result.label_map > 0) & (y < 30))
    touching = (result.label_map > 0) & (y >= 30)
    assert ndimage_label(touching)[1] == 1, "the two nodules' voxels touch"
    # both centres on slice 5, row 42, columns 40 and 47: the nearer centre is the nearer column
    np.testing.assert_array_equal(labels[touching & (x <= 43)], number[left.tracking_uid])
    np.testing.assert_array_equal(labels[touching & (x >= 44)], number[right.tracking_uid])


def test_segments_name_the_later_stage_whose_findings_they_hold(sources):
    card = nodule_card()
    for result, named in ((two_stage_result(sources, card), True), (nodule_result(sources, card), False)):
        back = _read_back(encode_seg(result, card, sources))
        algo = back.get_segment_description(1).algorithm_identification[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == (card.name, card.version)
        assert (SECOND_STAGE.weights_sha256 in algo.AlgorithmParameters) is named
        assert (f"{SECOND_STAGE.name} {SECOND_STAGE.version}" in algo.AlgorithmParameters) is named


def test_vertebra_seg_has_one_segment_per_level(sources):
    card = vertebra_card()
    result = vertebra_result(sources, card)
    back = _read_back(encode_seg(result, card, sources))
    assert [back.get_segment_description(n).segment_label for n in (1, 2)] == ["L1", "L2"]
    assert back.get_segment_description(2).segmented_property_type.value == "14293000"
    np.testing.assert_array_equal(_label_volume(back, result.source_sop_instance_uids), result.label_map)


def test_segments_are_renumbered_from_one_and_unreported_labels_dropped(sources):
    card = vertebra_card()
    result = vertebra_result(sources, card)
    label_map = np.where(result.label_map == 1, 7, result.label_map).astype(np.uint8)  # 7: no finding
    only_l2 = dataclasses.replace(result, findings=[result.findings[1]], label_map=label_map)
    back = _read_back(encode_seg(only_l2, card, sources))
    assert back.number_of_segments == 1 and back.get_segment_description(1).segment_label == "L2"
    labels = _label_volume(back, result.source_sop_instance_uids)
    np.testing.assert_array_equal(labels, (result.label_map == 2).astype(np.uint8))


def test_empty_label_map_gives_no_seg(sources):
    card = nodule_card()
    assert encode_seg(empty_result(sources, card), card, sources) is None


def test_missing_source_instance_is_an_encode_error(sources):
    card = nodule_card()
    with pytest.raises(EncodeError, match="source instance"):
        encode_seg(nodule_result(sources, card), card, sources[1:])


@pytest.mark.skipif(not dciodvfy_available(), reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("kind", ["nodules", "two-stage", "vertebrae"])
def test_seg_passes_dciodvfy_and_round_trip(sources, kind):
    card = vertebra_card() if kind == "vertebrae" else nodule_card()
    build = {"nodules": nodule_result, "two-stage": two_stage_result, "vertebrae": vertebra_result}[kind]
    result = build(sources, card)
    assert validate_output(encode_seg(result, card, sources)).ok
