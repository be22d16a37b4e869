"""The model card, `models/<name>/metadata.json`: what the gateway and Triton both need to know.

The same folder serves Triton directly (`config.pbtxt`, `<version>/model.onnx`); the card adds what
Triton does not: modality, spacing, window, labels with codes, thresholds, provenance.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NOT_FOR_CLINICAL_USE = "Research use only. Not for clinical use."


def check_flip_axes(flips: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Test-time flips must each name distinct model-grid axes among 0, 1, 2 (`InputSpec.flips`)."""
    for axes in flips:
        if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"flip axes must be distinct values among 0, 1, 2; got {list(axes)}")
    return flips


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeModel(_Strict):
    value: str
    scheme: str  # SCT, RADLEX, DCM, 99DXGATE
    meaning: str


class LabelSpec(_Strict):
    """One output class. `index` is the channel (softmax) or 1 for a single sigmoid channel."""

    index: int = Field(ge=1)
    name: str
    finding: CodeModel                 # TID 1500 finding type / SEG segmented property type
    category: CodeModel                # SEG segmented property category
    site: CodeModel | None = None      # anatomic location


class InputSpec(_Strict):
    name: str = "image"
    spacing_mm: tuple[float, float, float]     # (z, y, x) resampling target
    window: tuple[float, float]                # (low, high) HU mapped to [0, 1]
    roi_size: tuple[int, int, int]             # sliding-window patch (z, y, x)
    overlap: float = Field(default=0.25, ge=0, lt=1)
    batch_size: int = Field(default=4, ge=1)
    # test-time augmentation: one extra pass per entry over the image mirrored along these model-grid
    # axes (0 = slice, 1 = row, 2 = column), probabilities averaged (inference.model_pass)
    flips: list[tuple[int, ...]] = []
    # candidate classifiers only (inference.second_stage): the flipped passes re-score just the candidates whose
    # plain pass scores at least this; the others keep the plain score
    flip_screen: float = Field(default=0.0, ge=0, lt=1)

    _distinct_axes = field_validator("flips")(check_flip_axes)


class OutputSpec(_Strict):
    name: str = "logits"
    activation: Literal["sigmoid", "softmax"] = "sigmoid"
    channels: int = Field(ge=1)


class Thresholds(_Strict):
    probability: float = Field(default=0.5, gt=0, lt=1)
    min_diameter_mm: float = Field(default=0.0, ge=0)
    min_volume_mm3: float = Field(default=0.0, ge=0)
    # a finding whose mean attenuation is below min_mean_hu is air, not tissue (e.g. noise outside the
    # body); above max_mean_hu it is bone or calcification
    min_mean_hu: float | None = None
    max_mean_hu: float | None = None


class SeriesPreference(_Strict):
    """How the worker picks the one series the model reads from a study."""

    modalities: list[str]
    orientation: list[Literal["axial", "sagittal", "coronal"]] = ["axial"]
    min_slices: int = 16
    max_slice_thickness_mm: float | None = None
    prefer: Literal["thinnest", "most_slices"] = "thinnest"


class StageSpec(_Strict):
    """One stage of what produces a model's findings (`ModelCard.stages`, built by `inference.composition`).

    `kind` names the stage's entry in `inference.composition.STAGE_KINDS`; `model` the registered model whose
    weights run it (None: this card's own); `probability` the threshold it reports at within the composition
    (None: that model's own `thresholds.probability`).
    """

    kind: Literal["segmentation", "candidate_classification"]
    model: str | None = None
    probability: float | None = Field(default=None, gt=0, lt=1)


class ModelCard(_Strict):
    name: str
    version: str
    task: Literal["lung-nodule-detection", "vertebra-labelling", "lung-nodule-candidate-classification"]
    description: str
    modality: list[str]
    body_part: list[str]
    postprocess: Literal["nodules", "vertebrae", "candidates"]   # candidates: a later stage, inference.second_stage
    input: InputSpec
    output: OutputSpec
    labels: list[LabelSpec]
    thresholds: Thresholds = Thresholds()
    # vertebrae: drop levels found out of cranio-caudal order (postprocess.cranio_caudal_subset)
    ordered_levels: bool = False
    series: SeriesPreference
    # what produces the findings, in order; empty: one segmentation stage by this card's own weights
    stages: list[StageSpec] = []
    weights_file: str = "model.onnx"
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    training: dict = Field(default_factory=dict)   # data, seed, command, epochs, time
    metrics: dict = Field(default_factory=dict)    # held-out figures with the command that made them
    intended_use: str = NOT_FOR_CLINICAL_USE
    algorithm_manufacturer: str = "dxgate project"

    @property
    def runs_alone(self) -> bool:
        """False for a model that only runs as a later stage of another model's composition (a candidate
        classifier, postprocess "candidates")."""
        return self.postprocess != "candidates"

    def at_probability(self, probability: float | None) -> ModelCard:
        """This card reporting at `probability` (itself when None): a stage's threshold within a composition."""
        if probability is None:
            return self
        return self.model_copy(update={"thresholds": self.thresholds.model_copy(update={"probability": probability})})

    @model_validator(mode="after")
    def _stages_start_with_this_models_segmentation(self) -> ModelCard:
        if not self.stages:
            return self
        if not self.runs_alone:
            raise ValueError("a model that runs only as a stage of another model declares no stages")
        first, later = self.stages[0], self.stages[1:]
        if first.kind != "segmentation" or first.model not in (None, self.name):
            raise ValueError("the first stage is this model's own segmentation (kind 'segmentation', no model)")
        for spec in later:
            if spec.kind == "segmentation" or spec.model in (None, self.name):
                raise ValueError(f"a later stage ({spec.kind}) names another model whose weights run it")
        return self
