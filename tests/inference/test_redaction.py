"""`redact` against the real messages of pydicom and dciodvfy about a data set with PHI canaries: the values go,
attribute names and the kind of error stay."""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from harness.ct import ct_slices
from inference.errors import ValidationFailedError, VolumeError
from inference.redaction import REDACTED, redact
from inference.validation import dciodvfy, dciodvfy_available, validate_output

# what must never come out: the canaries, and the recognisable parts of the malformed values
CANARIES = ("CANARY", "PHI-CANARY-ID", "19010203", "1901-02-03", "0x43", "0x2d")

# (keyword, VR, raw value): valid PHI, and malformed values that pydicom and dciodvfy quote in their complaints
CANARY_ELEMENTS = (
    ("PatientName", "PN", b"CANARY^PHI"),
    ("PatientBirthDate", "DA", b"19010203"),
    ("PatientID", "LO", b"PHI-CANARY-ID "),
    ("PatientBirthTime", "TM", b"CANARY"),                        # letters in a time
    ("StudyDate", "DA", b"1901-02-03"),                           # dashes in a date
    ("PatientAge", "AS", b"CANARY-AGE"),                          # wrong length and characters
    ("PatientSex", "CS", b"CANARYSEX "),                          # not an enumerated value
    ("AccessionNumber", "SH", b"PHI-CANARY-ID-TOO-LONG-FOR-SH"),  # beyond 16 characters
    ("PatientWeight", "DS", b"CANARYWT"),                         # not a number
    ("OtherPatientIDs", "LO", b"PHI-CANARY-ID\x07 "),             # a control character
)


def canary_dataset() -> pydicom.Dataset:
    """A valid CT slice carrying `CANARY_ELEMENTS` as raw elements (nothing validates them on the way in)."""
    (ds,) = ct_slices(np.full((1, 16, 16), -1000.0, dtype=np.float32), spacing=(1.0, 0.7, 0.7),
                      origin=(0.0, 0.0, 0.0))
    for keyword, vr, value in CANARY_ELEMENTS:
        tag = Tag(keyword)
        ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    return ds


def write_canary_file(path: Path) -> Path:
    with config.disable_value_validation():
        canary_dataset().save_as(path, enforce_file_format=True)
    return path


def leaked(text: str) -> list[str]:
    return [c for c in CANARIES if c.lower() in text.lower()]


needs_dciodvfy = pytest.mark.skipif(not dciodvfy_available(), reason="dciodvfy (dicom3tools) not installed")


@needs_dciodvfy
def test_dciodvfy_lines_keep_attribute_names_and_the_error_but_not_the_values(tmp_path) -> None:  # noqa: ANN001
    path = write_canary_file(tmp_path / "canary.dcm")
    raw = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False).stderr
    assert leaked(raw), "dciodvfy no longer quotes the values: the test checks nothing"
    report = dciodvfy(path)
    lines = report.errors + report.warnings
    assert lines and not leaked("\n".join(lines)), "\n".join(lines)
    text = "\n".join(lines)
    for kept in ("(0x0010,0x0032) TM Patient's Birth Time", "Character invalid for this VR",
                 "(0x0008,0x0050) SH Accession Number", "Length invalid for this VR = 29, expected <= 16",
                 "Unrecognized enumerated value <…> for value 1 of attribute <Patient's Sex>",
                 "(0x0010,0x1030) DS Patient's Weight"):
        assert kept in text, f"{kept!r} lost:\n{text}"


@needs_dciodvfy
def test_a_failed_validation_names_the_attributes_only() -> None:
    with config.disable_value_validation(), pytest.raises(ValidationFailedError) as err:
        validate_output(canary_dataset())
    assert "dciodvfy" in str(err.value) and "Patient's" in str(err.value)
    assert not leaked(str(err.value)), str(err.value)


def _element_complaints(path: Path, mode: int) -> tuple[list[str], list[str]]:
    """(exception messages, warning messages) pydicom gives while reading every element of `path` and copying its
    value into a new data set."""
    errors: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        previous = config.settings.reading_validation_mode
        config.settings.reading_validation_mode = mode
        try:
            ds = pydicom.dcmread(path)
            copy = pydicom.Dataset()     # as an encoder copies the patient and study modules into its output
            for tag in list(ds.keys()):
                try:
                    elem = ds[tag]
                    if elem.keyword and elem.VR != "SQ":
                        setattr(copy, elem.keyword, elem.value)
                except Exception as exc:  # noqa: BLE001 - collecting pydicom's complaints is the point
                    errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            config.settings.reading_validation_mode = previous
    return errors, [str(w.message) for w in caught]


@pytest.mark.parametrize("mode", [config.RAISE, config.WARN], ids=["raise", "warn"])
def test_pydicom_complaints_keep_the_kind_of_error_but_not_the_values(tmp_path, mode) -> None:  # noqa: ANN001
    errors, warned = _element_complaints(write_canary_file(tmp_path / "canary.dcm"), mode)
    messages = errors + warned
    assert leaked("\n".join(messages)), "pydicom no longer quotes the values: the test checks nothing"
    redacted = [redact(m) for m in messages]
    assert not leaked("\n".join(redacted)), redacted
    text = "\n".join(redacted)
    assert "Invalid value for VR DA" in text or "could not convert string to float" in text, text
    assert all(REDACTED in r for r, m in zip(redacted, messages, strict=True) if leaked(m))


def test_a_series_with_a_canary_in_its_geometry_fails_without_quoting_it(series_writer) -> None:  # noqa: ANN001
    from inference.volume import load_series

    paths = series_writer(shape=(4, 8, 8))
    ds = pydicom.dcmread(paths[2])
    tag = Tag("ImagePositionPatient")
    ds[tag] = RawDataElement(tag, "DS", 16, b"PHI-CANARY\\1\\2 ", 0, False, True)
    with config.disable_value_validation():
        ds.save_as(paths[2], enforce_file_format=True)
    with pytest.raises(VolumeError, match="ImagePositionPatient is not a list of numbers") as err:
        load_series(paths)
    assert not leaked(str(err.value))


def test_third_party_text_wrapped_by_a_stage_is_redacted(series_writer, nodule_model) -> None:  # noqa: ANN001
    from inference.backends.onnxruntime_backend import OnnxRuntimeBackend
    from inference.pipeline import ModelRunner
    from inference.preprocess import PreprocessError

    def quoting(volume, card):  # noqa: ANN001, ANN202 - as pydicom does about a bad value
        raise ValueError("Invalid value for VR PN: 'CANARY^PHI'")

    backend = OnnxRuntimeBackend(nodule_model.weights_path, "m", providers=["CPUExecutionProvider"])
    with pytest.raises(PreprocessError, match=r"preprocess: ValueError: Invalid value for VR PN: …") as err:
        ModelRunner(nodule_model, backend, preprocessor=quoting).run(series_writer())
    assert not leaked(str(err.value))


@pytest.mark.parametrize(("message", "expected"), [
    ("Attribute \"PatientName\" is required, got 'O'Brien'", "Attribute \"PatientName\" is required, got …"),
    ("Error - Missing attribute Type 1 Required Element=<PatientID> Module=<Patient>",
     "Error - Missing attribute Type 1 Required Element=<PatientID> Module=<Patient>"),
    ("(0010,1030) Patient's Weight          DS: 70.5", "(0010,1030) Patient's Weight          DS: …"),
    ("Error - ... DA [1] = 19010203 - Bad", "Error - ... DA [1] = … - Bad"),
    ("b'CANARY' in <CANARY> at <PatientBirthDate>", "… in <…> at <PatientBirthDate>"),
    ("cannot build SEG: Unable to convert '1901-02-03' to 'DA' object",       # highdicom, via an encoder
     "cannot build SEG: Unable to convert … to 'DA' object"),
])
def test_redact_forms(message: str, expected: str) -> None:
    assert redact(message) == expected
    assert redact(expected) == expected   # idempotent
