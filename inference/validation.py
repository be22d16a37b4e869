"""Validation of every emitted DICOM object: `dciodvfy` (dicom3tools) and a pydicom/highdicom round trip.

`validate_output` is the gate between encoding and the outbox: an object that dciodvfy reports an
error for, or that does not read back with the same key content, raises `ValidationFailedError`.
dciodvfy's lines and pydicom's and highdicom's messages quote attribute values (a birth date): reports and
errors carry them redacted (`inference.redaction.redact`), attribute names and the kind of error kept.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import (
    Comprehensive3DSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from inference.errors import ValidationFailedError
from inference.redaction import redact

DCIODVFY = "dciodvfy"
DCIODVFY_TIMEOUT_S = 120.0

# dciodvfy messages that are known limitations of dciodvfy rather than defects of the object.
# Each entry: (regular expression matched against the whole message line, why it is acceptable).
# Keep this list short and specific; never add a pattern that matches whole classes of errors.
# It is empty today: the objects made by inference.encode pass dciodvfy without errors.
KNOWN_DCIODVFY_LIMITATIONS: tuple[tuple[re.Pattern[str], str], ...] = ()

# Only warnings, never errors: dciodvfy does not know private coding schemes (PS3.3 8.2: a "99" prefix
# marks a private scheme; ours is declared in the Coding Scheme Identification Sequence).
_PRIVATE_SCHEME_WARNING = re.compile(
    r"^Warning - Unrecognized defined term <99[A-Z0-9_]+> .*Coding Scheme Designator"
)


class DciodvfyNotInstalledError(ValidationFailedError):
    """The dicom3tools `dciodvfy` executable is not on PATH (Debian/Ubuntu: apt-get install dicom3tools)."""


@dataclass
class ValidationReport:
    ok: bool = True
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)  # errors accepted by KNOWN_DCIODVFY_LIMITATIONS

    def extend(self, other: ValidationReport) -> None:
        self.errors += other.errors
        self.warnings += other.warnings
        self.allowed += other.allowed
        self.ok = not self.errors


def dciodvfy_available() -> bool:
    return shutil.which(DCIODVFY) is not None


def dciodvfy(ds_or_path: pydicom.Dataset | str | os.PathLike[str]) -> ValidationReport:
    """Run dciodvfy on a dataset (written to a temporary file) or a file; parse Error/Warning lines (redacted).

    Raises DciodvfyNotInstalledError when dciodvfy is missing, ValidationFailedError when it aborts.
    """
    exe = shutil.which(DCIODVFY)
    if exe is None:
        raise DciodvfyNotInstalledError("dciodvfy (dicom3tools) is not installed; apt-get install dicom3tools")
    if isinstance(ds_or_path, pydicom.Dataset):
        with tempfile.TemporaryDirectory(prefix="dxgate-validate-") as tmp:
            path = Path(tmp) / "object.dcm"
            ds_or_path.save_as(path, enforce_file_format=True)
            return _run_dciodvfy(exe, path)
    return _run_dciodvfy(exe, Path(ds_or_path))


def _run_dciodvfy(exe: str, path: Path) -> ValidationReport:
    try:
        proc = subprocess.run(
            [exe, str(path)], capture_output=True, text=True, timeout=DCIODVFY_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ValidationFailedError(f"dciodvfy timed out after {DCIODVFY_TIMEOUT_S:.0f} s") from exc
    report = ValidationReport()
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        line = line.strip()
        if line.startswith("Abort"):
            raise ValidationFailedError(f"dciodvfy aborted: {redact(line)}")
        if line.startswith("Error"):
            why = next((reason for pattern, reason in KNOWN_DCIODVFY_LIMITATIONS if pattern.search(line)), None)
            (report.allowed if why else report.errors).append(redact(line))
        elif line.startswith("Warning") and not _PRIVATE_SCHEME_WARNING.search(line):
            report.warnings.append(redact(line))
    report.ok = not report.errors
    return report


def roundtrip(ds: pydicom.Dataset) -> None:
    """Write `ds` to bytes, read it back with pydicom and highdicom and compare the key content.

    Raises ValidationFailedError with the reason when the object does not survive the round trip.
    """
    buffer = io.BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
        back = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    except Exception as exc:  # any writer/reader failure means the object is unusable
        raise ValidationFailedError(f"pydicom cannot write/read the object: {redact(str(exc))}") from exc
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID"):
        if str(back.get(keyword, "")) != str(ds.get(keyword, "")):
            raise ValidationFailedError(f"{keyword} changed in the round trip")
    sop_class = str(back.SOPClassUID)
    try:
        if sop_class == Comprehensive3DSRStorage:
            _check_sr(ds, buffer.getvalue())
        elif sop_class == SegmentationStorage:
            _check_seg(ds, buffer.getvalue())
        elif sop_class == GrayscaleSoftcopyPresentationStateStorage:
            _check_gsps(back)
        elif sop_class == SecondaryCaptureImageStorage:
            _check_pixels(ds, back)
    except ValidationFailedError:
        raise
    except Exception as exc:  # highdicom raises many types when parsing fails
        raise ValidationFailedError(f"highdicom cannot read the object back: {redact(str(exc))}") from exc


def _check_sr(ds: pydicom.Dataset, data: bytes) -> None:
    sr = hd.sr.srread(io.BytesIO(data))
    if not isinstance(sr, hd.sr.Comprehensive3DSR):
        raise ValidationFailedError(f"SR reads back as {type(sr).__name__}")
    report = sr.content
    groups = report.get_volumetric_roi_measurement_groups() + report.get_planar_roi_measurement_groups()
    groups += report.get_image_measurement_groups()
    if not groups:
        raise ValidationFailedError("SR has no measurement group")
    # what was written, read straight from the content tree (a second highdicom parse of the original
    # doubled the validation time of an SR with many findings)
    expected = set(_tracking_uids(ds))
    found = {str(g.tracking_uid) for g in groups if g.tracking_uid is not None}
    if expected != found:
        raise ValidationFailedError("SR measurement groups changed in the round trip")


_TRACKING_UID = "112040"   # DCM "Tracking Unique Identifier" (PS3.16 TID 1501 / 1411)
_VOLUMETRIC_GROUP = "125007"   # DCM "Measurement Group"


def _tracking_uids(ds: pydicom.Dataset) -> list[str]:
    """Tracking UIDs of the measurement groups (TID 1411 / 1410 / 1501) in an SR content tree."""
    out: list[str] = []

    def walk(items: pydicom.Sequence, in_group: bool) -> None:
        for item in items:
            code = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""
            if in_group and code == _TRACKING_UID and item.get("ValueType") == "UIDREF":
                out.append(str(item.UID))
            if "ContentSequence" in item:
                walk(item.ContentSequence, code == _VOLUMETRIC_GROUP and item.get("ValueType") == "CONTAINER")

    walk(ds.get("ContentSequence", []), False)
    return out


def _check_seg(ds: pydicom.Dataset, data: bytes) -> None:
    seg = hd.seg.segread(io.BytesIO(data))
    if seg.number_of_segments != len(ds.SegmentSequence) or seg.number_of_segments < 1:
        raise ValidationFailedError("SEG segment count changed in the round trip")
    if not np.array_equal(seg.pixel_array, ds.pixel_array):
        raise ValidationFailedError("SEG frames changed in the round trip")
    if not seg.get_source_image_uids():
        raise ValidationFailedError("SEG references no source image")


def _check_gsps(back: pydicom.Dataset) -> None:
    if not back.get("ReferencedSeriesSequence"):
        raise ValidationFailedError("GSPS references no image")
    if not back.get("GraphicAnnotationSequence"):
        raise ValidationFailedError("GSPS has no graphic annotation")


def _check_pixels(ds: pydicom.Dataset, back: pydicom.Dataset) -> None:
    if not np.array_equal(back.pixel_array, ds.pixel_array):
        raise ValidationFailedError("pixel data changed in the round trip")
    if not back.get("SourceImageSequence"):
        raise ValidationFailedError("secondary capture references no source image")


def validate_output(ds: pydicom.Dataset, *, require_dciodvfy: bool = True) -> ValidationReport:
    """Round trip + dciodvfy; raises ValidationFailedError when either finds an error.

    With `require_dciodvfy=False` a missing dciodvfy becomes a warning instead of an error.
    """
    roundtrip(ds)
    report = ValidationReport()
    try:
        report.extend(dciodvfy(ds))
    except DciodvfyNotInstalledError as exc:
        if require_dciodvfy:
            raise
        report.warnings.append(str(exc))
    if report.errors:
        raise ValidationFailedError(
            f"dciodvfy: {len(report.errors)} error(s) in {ds.get('SOPClassUID', '?')}: "
            + "; ".join(report.errors[:5])
        )
    return report
