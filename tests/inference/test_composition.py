"""A model is a composition of stages: the card declares them, `build_runner` builds the runner from them."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest

from inference.backends.factory import make_backend
from inference.composition import STAGE_KINDS, build_runner, describe, stage_models
from inference.errors import ModelCardError
from inference.findings import Algorithm, Code, Finding, algorithm_of
from inference.model_card import ModelCard
from inference.model_repo import RegisteredModel, composing_models, discover_models
from inference.postprocess import PostprocessError
from inference.second_stage import CandidateStage

REPO_MODELS = Path(__file__).resolve().parents[2] / "models"
SPHERE_MM = (-6.0, 3.0, 118.0)


class NoBackend:
    """Stands in for a warm backend where none is called."""

    def infer(self, inputs):  # noqa: ANN001, ANN201
        raise AssertionError("not called")

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def shipped() -> dict[str, RegisteredModel]:
    found = discover_models(REPO_MODELS)
    if not {"lung_nodule_ct", "lung_nodule_candidates_ct"} <= set(found):
        pytest.skip("the shipped lung pair is not in models/")
    return found


def test_the_lung_card_declares_its_segmentation_then_the_candidate_classifier(shipped) -> None:
    lung = shipped["lung_nodule_ct"].card
    assert [(s.kind, s.model) for s in lung.stages] == [("segmentation", None),
                                                        ("candidate_classification", "lung_nodule_candidates_ct")]
    assert stage_models(lung) == ["lung_nodule_candidates_ct"]
    assert composing_models("lung_nodule_candidates_ct", shipped) == ["lung_nodule_ct"]
    assert composing_models("lung_nodule_ct", shipped) == []
    assert not shipped["lung_nodule_candidates_ct"].card.runs_alone and lung.runs_alone
    assert set(STAGE_KINDS) == {"segmentation", "candidate_classification"}


def test_the_runner_is_built_from_the_declaration(shipped) -> None:
    backends = {name: NoBackend() for name in shipped}
    lung = shipped["lung_nodule_ct"]
    runner = build_runner(lung, shipped, backends)
    first, second = lung.card.stages
    (stage,) = runner.stages
    assert isinstance(stage, CandidateStage) and stage.backend is backends["lung_nodule_candidates_ct"]
    assert stage.card.thresholds.probability == second.probability
    assert runner.backend is backends["lung_nodule_ct"]
    assert runner.card.thresholds.probability == first.probability != lung.card.thresholds.probability
    assert runner.algorithms == [algorithm_of(lung.card), algorithm_of(shipped["lung_nodule_candidates_ct"].card)]
    assert describe(runner) == "lung_nodule_ct 1 + lung_nodule_candidates_ct 1"
    spine = build_runner(shipped["spine_vertebrae_ct"], shipped, backends)
    assert spine.stages == [] and spine.card == shipped["spine_vertebrae_ct"].card


def test_without_its_stage_models_a_model_runs_alone_at_its_own_thresholds(shipped, caplog) -> None:
    lung = shipped["lung_nodule_ct"]
    backends = {name: NoBackend() for name in shipped}
    alone = build_runner(lung, shipped, backends, first_stage_only=True)
    assert alone.stages == [] and alone.card == lung.card
    with caplog.at_level(logging.WARNING, logger="inference.composition"):
        missing = build_runner(lung, {"lung_nodule_ct": lung}, {"lung_nodule_ct": NoBackend()})
    assert missing.stages == [] and missing.card == lung.card
    assert "lung_nodule_candidates_ct not installed" in caplog.text


def test_a_candidate_stage_must_name_a_candidate_classifier(shipped) -> None:
    lung = shipped["lung_nodule_ct"]
    fields = lung.card.model_dump()
    fields["stages"][1]["model"] = "spine_vertebrae_ct"
    wrong = dataclasses.replace(lung, card=ModelCard.model_validate(fields))
    with pytest.raises(ModelCardError, match="not a candidate classifier"):
        build_runner(wrong, shipped, {name: NoBackend() for name in shipped})


@pytest.mark.parametrize(("stages", "message"), [
    ([{"kind": "candidate_classification", "model": "other"}], "first stage is this model's own segmentation"),
    ([{"kind": "segmentation", "model": "other"}], "first stage is this model's own segmentation"),
    ([{"kind": "segmentation"}, {"kind": "candidate_classification"}], "names another model"),
    ([{"kind": "segmentation"}, {"kind": "segmentation", "model": "other"}], "names another model"),
    ([{"kind": "segmentation"}, {"kind": "lung", "model": "other"}], "candidate_classification"),
])
def test_a_card_declares_its_own_segmentation_first_and_other_models_after(shipped, stages, message) -> None:
    fields = shipped["lung_nodule_ct"].card.model_dump()
    with pytest.raises(ValueError, match=message):
        ModelCard.model_validate({**fields, "stages": stages})


def test_a_classifier_alone_is_refused(shipped, series_writer) -> None:
    model = shipped["lung_nodule_candidates_ct"]
    runner = build_runner(model, shipped, {name: NoBackend() for name in shipped})
    with pytest.raises(PostprocessError, match="runs only as a stage"):
        runner.run(series_writer("ct", sphere_mm=None))


@dataclasses.dataclass
class AddOne:
    """A later stage adding one finding at a fixed place, more probable than any of the model's."""

    algorithm: Algorithm = Algorithm("adds_one", "2", "ab" * 32)
    seen: list[int] = dataclasses.field(default_factory=list)

    def findings(self, volume, found, label_map):  # noqa: ANN001, ANN201
        self.seen.append(len(found))
        label_map[0, 0, 0] = 1
        return [Finding(label_index=1, label="Lung nodule", finding_code=Code("27925004", "SCT", "Nodule"),
                        centre_mm=tuple(float(v) for v in volume.index_to_patient(np.zeros(3))), probability=1.0,
                        algorithm=self.algorithm)]


def test_each_finding_carries_the_provenance_of_the_stage_that_produced_it(nodule_model, series_writer) -> None:
    from inference.pipeline import ModelRunner

    backend = make_backend(nodule_model, "onnxruntime", intra_op_threads=1)
    try:
        stage = AddOne()
        result = ModelRunner(nodule_model, backend, stages=[stage]).run(
            series_writer("ct", sphere_mm=SPHERE_MM, radius_mm=6.0))
    finally:
        backend.close()
    own = algorithm_of(nodule_model.card)
    assert stage.seen == [1], "the later stage sees the model's findings"
    assert [f.algorithm for f in result.findings] == [stage.algorithm, own]   # most probable first
    assert result.algorithms == [own, stage.algorithm]
    assert result.model_version == "1+adds_one.2" and result.label_map[0, 0, 0] == 1
