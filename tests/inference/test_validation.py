"""The validation gate: dciodvfy parsing, the round trip, and a clear error without dicom3tools."""

from __future__ import annotations

import copy

import pytest

from inference.encode import encode_seg
from inference.errors import ValidationFailedError
from inference.validation import (
    KNOWN_DCIODVFY_LIMITATIONS,
    DciodvfyNotInstalledError,
    dciodvfy,
    dciodvfy_available,
    roundtrip,
    validate_output,
)
from tests.inference.encode_fixtures import build_ct_series, nodule_card, nodule_result

needs_dciodvfy = pytest.mark.skipif(not dciodvfy_available(), reason="dciodvfy (dicom3tools) not installed")


@pytest.fixture(scope="module")
def sources():
    return build_ct_series()


@needs_dciodvfy
def test_valid_ct_has_no_errors(sources, tmp_path):
    path = tmp_path / "ct.dcm"
    sources[0].save_as(path, enforce_file_format=True)
    assert dciodvfy(path).ok and dciodvfy(sources[0]).errors == []


@needs_dciodvfy
def test_missing_type1_attribute_is_an_error(sources):
    broken = copy.deepcopy(sources[0])
    del broken.ImageOrientationPatient
    report = dciodvfy(broken)
    assert not report.ok and any("ImageOrientationPatient" in e for e in report.errors)
    with pytest.raises(ValidationFailedError, match="dciodvfy"):
        validate_output(broken)


def test_roundtrip_accepts_a_seg_and_rejects_an_unreadable_sr(sources):
    card = nodule_card()
    seg = encode_seg(nodule_result(sources, card), card, sources)
    roundtrip(seg)
    not_an_sr = copy.deepcopy(sources[0])
    not_an_sr.SOPClassUID = not_an_sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    with pytest.raises(ValidationFailedError, match="highdicom"):
        roundtrip(not_an_sr)


def test_missing_dciodvfy_is_a_clear_error(sources, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: dicom3tools is not installed
    with pytest.raises(DciodvfyNotInstalledError, match="dicom3tools"):
        dciodvfy(sources[0])
    with pytest.raises(DciodvfyNotInstalledError):
        validate_output(sources[0])
    report = validate_output(sources[0], require_dciodvfy=False)
    assert report.ok and any("not installed" in w for w in report.warnings)


def test_allow_list_entries_are_documented():
    for pattern, why in KNOWN_DCIODVFY_LIMITATIONS:
        assert pattern.pattern and len(why) > 20
