"""Grayscale Softcopy Presentation State (PS3.3 A.33.1) drawing the findings, built with highdicom.

For viewers that render neither SR nor SEG: on the source slice nearest each finding a CIRCLE of the
finding's diameter (Graphic Annotation Module, PS3.3 C.10.5) and a text object with label, diameter
and probability, with a display window that suits the model (lung or bone, PS3.3 C.11.8).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom

from inference.encode.common import (
    NOT_FOR_CLINICAL_USE,
    annotation_text,
    centre_pixel,
    display_diameter_mm,
    nearest_source,
    new_instance,
    ordered_sources,
    series_description,
    set_body_part,
    window_for,
)
from inference.encode.naming import named
from inference.errors import EncodeError
from inference.findings import Finding, InferenceResult
from inference.model_card import ModelCard
from inference.redaction import redact

LAYER = "DXGATE"


def encode_gsps(
    result: InferenceResult,
    card: ModelCard,
    sources: Sequence[pydicom.Dataset],
    *,
    series_number: int = 9002,
    instance_number: int = 1,
) -> pydicom.Dataset | None:
    """One presentation state annotating every finding on its nearest source slice; None if no finding."""
    if not result.findings:
        return None
    result = named(result, card)
    ordered = ordered_sources(result, sources)
    by_image: dict[str, list[Finding]] = defaultdict(list)
    images: dict[str, pydicom.Dataset] = {}
    for finding in result.findings:
        image = nearest_source(finding, ordered)
        by_image[str(image.SOPInstanceUID)].append(finding)
        images[str(image.SOPInstanceUID)] = image
    layer = hd.pr.GraphicLayer(layer_name=LAYER, order=1, description=f"dxgate {card.name} {NOT_FOR_CLINICAL_USE}")
    center, width = window_for(card)
    try:
        annotations = [
            hd.pr.GraphicAnnotation(
                referenced_images=[images[uid]],
                graphic_layer=layer,
                graphic_objects=[_circle(f, images[uid]) for f in findings],
                text_objects=[_text(f, images[uid]) for f in findings],
            )
            for uid, findings in by_image.items()
        ]
        gsps = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=list(images.values()),
            **new_instance(card, series_number, instance_number),
            content_label="DXGATE",
            content_description=f"{card.name} {card.version} {NOT_FOR_CLINICAL_USE}"[:64],
            graphic_annotations=annotations,
            graphic_layers=[layer],
            voi_lut_transformations=[
                hd.pr.SoftcopyVOILUTTransformation(
                    window_center=center, window_width=width, window_explanation=card.postprocess.upper()
                )
            ],
            series_description=series_description(card, "GSPS"),
        )
    except (ValueError, TypeError) as exc:
        raise EncodeError(f"cannot build GSPS: {redact(str(exc))}") from exc
    set_body_part(gsps, ordered[0], card)
    return gsps


def _geometry(finding: Finding, image: pydicom.Dataset) -> tuple[float, float, float]:
    """Centre (column, row) in GSPS pixel coordinates (origin at the top-left pixel's corner) and radius."""
    col, row = centre_pixel(finding, image)
    radius = display_diameter_mm(finding) / 2.0 / float(image.PixelSpacing[1])
    return col + 0.5, row + 0.5, radius


def _circle(finding: Finding, image: pydicom.Dataset) -> hd.pr.GraphicObject:
    col, row, radius = _geometry(finding, image)
    cols, rows = float(image.Columns), float(image.Rows)
    col, row = float(np.clip(col, 0.0, cols)), float(np.clip(row, 0.0, rows))
    # The second point (on the circle) must lie inside the image too (PS3.3 C.10.5.1.2): put it on
    # whichever side has room, shrinking the circle only for a finding wider than the image.
    radius = min(radius, max(col, cols - col))
    edge = col + radius if col + radius <= cols else col - radius
    return hd.pr.GraphicObject(
        graphic_type=hd.pr.GraphicTypeValues.CIRCLE,
        graphic_data=np.array([[col, row], [edge, row]]),
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        tracking_id=finding.display_name if finding.tracking_uid else None,
        tracking_uid=finding.tracking_uid,
    )


def _text(finding: Finding, image: pydicom.Dataset) -> hd.pr.TextObject:
    col, row, radius = _geometry(finding, image)
    anchor = (
        float(np.clip(col + radius, 1.0, float(image.Columns) - 1.0)),
        float(np.clip(row - radius, 1.0, float(image.Rows) - 1.0)),
    )
    return hd.pr.TextObject(
        text_value=annotation_text(finding),
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        anchor_point=anchor,
        anchor_point_visible=False,
        text_justification=hd.pr.TextJustificationValues.LEFT,
    )
