"""Burned-in overlay fallback: RGB Secondary Capture images (PS3.3 A.8.1) built with highdicom.

For each source slice nearest a finding: window the slice (lung or bone window), draw a circle and a
label for every finding on it plus a "NOT FOR CLINICAL USE" banner with Pillow, and encode it with
`highdicom.sc.SCImage` in the source study, with Burned In Annotation YES (PS3.3 C.7.6.1.1.3) and the
source slice in the Source Image Sequence (C.7.6.1.1.4).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference.encode.common import (
    MANUFACTURER,
    NOT_FOR_CLINICAL_USE,
    annotation_text,
    centre_pixel,
    display_diameter_mm,
    nearest_source,
    ordered_sources,
    series_description,
    set_body_part,
    software_versions,
    window_for,
)
from inference.encode.naming import named
from inference.errors import EncodeError
from inference.findings import Finding, InferenceResult
from inference.model_card import ModelCard
from inference.redaction import redact

COLOUR = (255, 220, 0)


def encode_secondary_capture(
    result: InferenceResult,
    card: ModelCard,
    sources: Sequence[pydicom.Dataset],
    *,
    series_number: int = 9003,
) -> list[pydicom.Dataset]:
    """One SC image per source slice that is nearest to at least one finding; [] when no finding."""
    if not result.findings:
        return []
    result = named(result, card)
    ordered = ordered_sources(result, sources)
    by_image: dict[str, list[Finding]] = defaultdict(list)
    images: dict[str, pydicom.Dataset] = {}
    for finding in result.findings:
        image = nearest_source(finding, ordered)
        by_image[str(image.SOPInstanceUID)].append(finding)
        images[str(image.SOPInstanceUID)] = image
    series_uid = generate_uid()
    position = {str(ds.SOPInstanceUID): i for i, ds in enumerate(ordered)}
    uids = sorted(by_image, key=position.__getitem__)
    return [
        _encode_one(images[uid], by_image[uid], card, series_uid, series_number, number)
        for number, uid in enumerate(uids, start=1)
    ]


def render_overlay(image: pydicom.Dataset, findings: Sequence[Finding], card: ModelCard) -> np.ndarray:
    """The windowed slice as RGB uint8 [rows, cols, 3] with circles, labels and a banner burned in."""
    hu = apply_modality_lut(image.pixel_array, image).astype(np.float32)
    center, width = window_for(card)
    grey = np.clip((hu - (center - width / 2.0)) / width, 0.0, 1.0) * 255.0
    canvas = Image.fromarray(grey.astype(np.uint8), mode="L").convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font_size = max(8, int(image.Columns) // 40)
    font = ImageFont.load_default(size=font_size)
    for finding in findings:
        col, row = centre_pixel(finding, image)
        radius = display_diameter_mm(finding) / 2.0 / float(image.PixelSpacing[1]) + 2.0
        draw.ellipse([col - radius, row - radius, col + radius, row + radius], outline=COLOUR, width=1)
        text = annotation_text(finding)
        x = col + radius + 2
        if x + draw.textlength(text, font=font) > int(image.Columns):  # keep the label on the image
            x = max(0.0, col - radius - 2 - draw.textlength(text, font=font))
        draw.text((x, max(0.0, row - radius - font_size)), text, fill=COLOUR, font=font)
    draw.text((2, int(image.Rows) - font_size - 2), NOT_FOR_CLINICAL_USE, fill=COLOUR, font=font)
    return np.asarray(canvas, dtype=np.uint8)


def _encode_one(
    image: pydicom.Dataset,
    findings: Sequence[Finding],
    card: ModelCard,
    series_uid: str,
    series_number: int,
    instance_number: int,
) -> pydicom.Dataset:
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=image,
            pixel_array=render_overlay(image, findings, card),
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            pixel_spacing=tuple(float(v) for v in image.PixelSpacing),
            patient_orientation=patient_orientation(image),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=series_description(card, "SC"),
            manufacturer_model_name=card.name[:64],
            software_versions=software_versions(card),
            device_serial_number=card.weights_sha256[:16],
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodeError(f"cannot build secondary capture: {redact(str(exc))}") from exc
    set_body_part(sc, image, card)
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ImageComments = f"{card.name} {card.version}: {card.intended_use}"[:10240]
    sc.DerivationDescription = f"dxgate {card.name} {card.version} findings burned into the source slice"[:1024]
    source = pydicom.Dataset()
    source.ReferencedSOPClassUID = image.SOPClassUID
    source.ReferencedSOPInstanceUID = image.SOPInstanceUID
    sc.SourceImageSequence = [source]
    return sc


def patient_orientation(image: pydicom.Dataset) -> tuple[str, str]:
    """Patient Orientation (PS3.3 C.7.6.1.1.1) of rows and columns from the dominant axis of the IOP."""
    iop = np.asarray(image.ImageOrientationPatient, dtype=float)
    letters = (("R", "L"), ("A", "P"), ("F", "H"))

    def letter(vector: np.ndarray) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return letters[axis][int(vector[axis] > 0)]

    return letter(iop[:3]), letter(iop[3:])
