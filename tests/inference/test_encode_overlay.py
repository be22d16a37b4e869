"""GSPS and burned-in secondary captures: the right source slice, the right place, valid objects."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage, SecondaryCaptureImageStorage

from inference.encode import encode_gsps, encode_secondary_capture
from inference.encode.common import LUNG_WINDOW
from inference.validation import dciodvfy_available, validate_output
from tests.inference.encode_fixtures import (
    PIXEL_SPACING,
    build_ct_series,
    empty_result,
    nodule_card,
    nodule_result,
    vertebra_card,
    vertebra_result,
)

needs_dciodvfy = pytest.mark.skipif(not dciodvfy_available(), reason="dciodvfy (dicom3tools) not installed")
# fixture nodules: (slice, row, col) centres (3, 20, 22) and (5, 42, 40)
NODULE_SLICES, NODULE_PIXELS = (3, 5), ((22, 20), (40, 42))


@pytest.fixture(scope="module")
def sources():
    return build_ct_series()


def test_gsps_annotates_each_finding_on_its_slice(sources):
    card = nodule_card()
    result = nodule_result(sources, card)
    gsps = encode_gsps(result, card, sources)
    assert gsps.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage
    assert gsps.StudyInstanceUID == sources[0].StudyInstanceUID and gsps.PatientID == sources[0].PatientID
    assert gsps.SeriesNumber == 9002 and "NOT FOR CLINICAL USE" in gsps.SeriesDescription
    (series,) = gsps.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedImageSequence} == {
        sources[i].SOPInstanceUID for i in NODULE_SLICES
    }
    voi = gsps.SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == LUNG_WINDOW
    # annotations in the report's cranio-caudal order: the superior nodule (slice 5) first
    for annotation, index, (col, row), finding in zip(
        gsps.GraphicAnnotationSequence, NODULE_SLICES[::-1], NODULE_PIXELS[::-1], result.findings[::-1], strict=True
    ):
        assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == sources[index].SOPInstanceUID
        (circle,) = annotation.GraphicObjectSequence
        assert circle.GraphicType == "CIRCLE" and circle.GraphicAnnotationUnits == "PIXEL"
        cx, cy, ex, _ = (float(v) for v in circle.GraphicData)
        assert (cx, cy) == pytest.approx((col + 0.5, row + 0.5))  # pixel centre, corner origin
        assert ex - cx == pytest.approx(finding.diameter_mm / 2 / PIXEL_SPACING[1])
        (text,) = annotation.TextObjectSequence
        label = text.UnformattedTextValue
        assert "Lung nodule" in label and f"p={finding.probability:.2f}" in label and "mm" in label


def test_secondary_capture_burns_in_findings(sources):
    card = nodule_card()
    result = nodule_result(sources, card)
    images = encode_secondary_capture(result, card, sources)
    assert len(images) == 2 and len({i.SeriesInstanceUID for i in images}) == 1
    for sc, index, (col, row) in zip(images, NODULE_SLICES, NODULE_PIXELS, strict=True):
        assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.BurnedInAnnotation == "YES"
        assert sc.StudyInstanceUID == sources[0].StudyInstanceUID and sc.PatientID == sources[0].PatientID
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == sources[index].SOPInstanceUID
        assert sc.PhotometricInterpretation == "RGB" and (sc.Rows, sc.Columns) == (64, 64)
        pixels = sc.pixel_array
        assert pixels.shape == (64, 64, 3)
        # the centre is grey (windowed lung), a yellow ring surrounds it
        assert len(set(pixels[row, col].tolist())) == 1
        ring = pixels[max(row - 12, 0) : row + 13, max(col - 12, 0) : col + 13]
        assert np.any((ring[..., 0] > 200) & (ring[..., 2] < 50))


def test_no_finding_gives_no_overlay(sources):
    card = nodule_card()
    result = empty_result(sources, card)
    assert encode_gsps(result, card, sources) is None
    assert encode_secondary_capture(result, card, sources) == []


@needs_dciodvfy
@pytest.mark.parametrize("kind", ["nodules", "vertebrae"])
def test_overlays_pass_dciodvfy_and_round_trip(sources, kind):
    card = nodule_card() if kind == "nodules" else vertebra_card()
    result = nodule_result(sources, card) if kind == "nodules" else vertebra_result(sources, card)
    assert validate_output(encode_gsps(result, card, sources)).ok
    for sc in encode_secondary_capture(result, card, sources):
        assert validate_output(sc).ok
