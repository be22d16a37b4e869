"""A model is a composition of stages: its card declares them (`ModelCard.stages`), `build_runner` builds them.

Stage kinds, one entry each in `STAGE_KINDS` (a builder taking the stage's declaration, the registered model whose
weights run it and that model's backend):
- `segmentation`: the card's own network over the whole volume (preprocess, sliding window, postprocess) at the
  declared threshold; always the first stage, run by `inference.pipeline.ModelRunner` itself;
- `candidate_classification`: blob candidates scored by another registered model's classifier; those at or above
  its threshold that no earlier finding covers are added (`inference.second_stage.CandidateStage`).

A card without stages is one segmentation stage by its own weights at its own thresholds. Each finding carries the
provenance of the stage's model that produced it (`Finding.algorithm`), which the SR and SEG report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from inference.backends.base import Backend
from inference.errors import ModelCardError
from inference.limits import DEFAULT_LIMITS, VolumeLimits
from inference.model_card import ModelCard, StageSpec
from inference.model_repo import RegisteredModel
from inference.pipeline import LaterStage, ModelRunner, Preprocessor
from inference.second_stage import CandidateStage

log = logging.getLogger(__name__)

StageBuilder = Callable[[StageSpec, RegisteredModel, Backend], LaterStage]


def candidate_classification(spec: StageSpec, model: RegisteredModel, backend: Backend) -> LaterStage:
    """The `candidate_classification` stage of `model`'s classifier, at the declared threshold."""
    if model.card.runs_alone:
        raise ModelCardError(f"stage {spec.kind}: {model.name} is not a candidate classifier "
                             f"(postprocess {model.card.postprocess!r})")
    return CandidateStage(card=model.card.at_probability(spec.probability), backend=backend)


STAGE_KINDS: dict[str, StageBuilder | None] = {
    "segmentation": None,          # the model's own first stage: ModelRunner
    "candidate_classification": candidate_classification,
}


def stage_models(card: ModelCard) -> list[str]:
    """The registered models whose weights run the later stages of `card`'s composition, in order."""
    return [str(spec.model) for spec in card.stages[1:]]


def build_runner(model: RegisteredModel, models: Mapping[str, RegisteredModel], backends: Mapping[str, Backend], *,
                 preprocessor: Preprocessor | None = None, blend_mode: str = "gaussian",
                 first_stage_only: bool = False, limits: VolumeLimits = DEFAULT_LIMITS) -> ModelRunner:
    """The runner of `model` as its card composes it, from the discovered `models` and their warm `backends` (by
    name; `backends[model.name]` runs the model's own weights), bounded by `limits` (`ModelRunner`).

    A composition whose later stage names a model that is not installed (or has no backend) runs the model alone at
    its own thresholds, with a warning; so does `first_stage_only`.
    """
    card = model.card
    backend = backends[model.name]
    if first_stage_only or not card.stages:
        return ModelRunner(model, backend, blend_mode=blend_mode, preprocessor=preprocessor, limits=limits)
    missing = [name for name in stage_models(card) if name not in models or name not in backends]
    if missing:
        log.warning("model %s: stage model(s) %s not installed; it runs alone at its own thresholds", model.name,
                    ", ".join(missing))
        return ModelRunner(model, backend, blend_mode=blend_mode, preprocessor=preprocessor, limits=limits)
    later = []
    for spec in card.stages[1:]:
        builder = STAGE_KINDS[spec.kind]
        if builder is None:
            raise ModelCardError(f"{model.name}: a {spec.kind} stage can only be the first")
        name = str(spec.model)
        later.append(builder(spec, models[name], backends[name]))
    runner = ModelRunner(model, backend, blend_mode=blend_mode, preprocessor=preprocessor, stages=later,
                         probability=card.stages[0].probability, limits=limits)
    log.info("model %s composed of %s", model.name, describe(runner))
    return runner


def describe(runner: ModelRunner) -> str:
    """The stages of a built runner, e.g. `lung_nodule_ct 1 + lung_nodule_candidates_ct 1`."""
    return " + ".join(f"{a.name} {a.version}" for a in runner.algorithms)
