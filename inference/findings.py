"""What a model found, in patient coordinates: the currency between postprocessing and encoders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from inference.model_card import ModelCard


@dataclass(frozen=True)
class Code:
    """A coded concept (PS3.3 8.8): value, scheme designator (SCT, RADLEX, DCM, 99DXGATE), meaning."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Algorithm:
    """The model that made a finding: TID 4019 Algorithm Identification in the SR (PS3.16), the Algorithm
    Identification Sequence of a SEG segment (PS3.3 C.8.20.2)."""

    name: str
    version: str
    weights_sha256: str


def algorithm_of(card: ModelCard) -> Algorithm:
    """The identity of the model a card describes."""
    return Algorithm(card.name, card.version, card.weights_sha256)


@dataclass(frozen=True)
class Finding:
    """One detected object.

    centre_mm is (x, y, z) in the patient coordinate system (LPS, PS3.3 C.7.6.2.1.1).
    label_index equals the model card's `LabelSpec.index` of the finding's class: the value its voxels
    hold in `InferenceResult.label_map` (one SEG segment per class; findings keep their own identity).
    """

    label_index: int
    label: str                    # e.g. "Lung nodule", "L3"
    finding_code: Code            # e.g. SCT 27925004 Nodule; vertebra codes for spine
    centre_mm: tuple[float, float, float]
    probability: float
    diameter_mm: float | None = None
    volume_mm3: float | None = None
    site_code: Code | None = None  # anatomic location (e.g. SCT 39607008 Lung)
    referenced_sop_instance_uid: str | None = None  # the source slice nearest the centre
    tracking_uid: str | None = None
    algorithm: Algorithm | None = None   # the model that produced it (each stage sets its own); None: the result's
    name: str | None = None  # unique within a report ("Lung nodule 2"), set by `inference.encode.naming.named`

    @property
    def display_name(self) -> str:
        """The finding's name in the report, else its label."""
        return self.name or self.label


@dataclass
class InferenceResult:
    """Findings plus a label map on the *source* series grid (slices sorted along the normal).

    label_map: uint8 (or uint16) array [n_slices, rows, cols], 0 = background, value k = class with
    LabelSpec.index k. source_sop_instance_uids[i] is the SOP Instance UID of slice i.
    """

    findings: list[Finding]
    label_map: np.ndarray
    source_sop_instance_uids: list[str]
    model_name: str
    model_version: str
    weights_sha256: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # every stage that ran (`ModelCard.stages`), the model's own first; empty when not recorded
    algorithms: list[Algorithm] = field(default_factory=list)
