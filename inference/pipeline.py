"""One model, run in-process: DICOM series -> volume -> preprocess -> backend -> postprocess -> later stages -> result.

The runner is the first (segmentation) stage of a model's composition plus the later stages that add findings to
it; `inference.composition.build_runner` builds one from the model's card.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np

from inference.backends.base import Backend
from inference.errors import BackendError, InferenceError, VolumeError
from inference.findings import Algorithm, Finding, InferenceResult, algorithm_of
from inference.limits import DEFAULT_LIMITS, VolumeLimits
from inference.model_card import ModelCard
from inference.model_pass import model_logits
from inference.model_repo import RegisteredModel
from inference.plausibility import check_ct_values
from inference.postprocess import PostprocessError, postprocess
from inference.preprocess import PreprocessError, ResampleInfo, preprocess
from inference.redaction import redact
from inference.volume import Volume, load_series

log = logging.getLogger(__name__)

Preprocessor = Callable[[Volume, ModelCard], tuple[np.ndarray, ResampleInfo]]

STAGES = ("load", "preprocess", "infer", "postprocess")
_STAGE_ERRORS: dict[str, type[InferenceError]] = {
    "load": VolumeError,
    "preprocess": PreprocessError,
    "infer": BackendError,
    "postprocess": PostprocessError,
}


@contextmanager
def _stage(name: str, seconds: dict[str, float]) -> Iterator[None]:
    """Time a stage; re-raise anything that is not already this stage's error as that error (cause kept)."""
    start = time.perf_counter()
    try:
        yield
    except InferenceError as exc:
        if exc.stage == name or isinstance(exc, _STAGE_ERRORS[name]):
            raise
        raise _STAGE_ERRORS[name](f"{name}: {exc}") from exc
    except Exception as exc:  # third-party text (pydicom, decoders) may quote attribute values: redacted
        raise _STAGE_ERRORS[name](f"{name}: {type(exc).__name__}: {redact(str(exc))}") from exc
    finally:
        seconds[name] = time.perf_counter() - start


class LaterStage(Protocol):
    """A stage after the first: adds findings to those of the stages before it (`inference.composition`)."""

    @property
    def algorithm(self) -> Algorithm: ...

    def findings(self, volume: Volume, found: list[Finding], label_map: np.ndarray) -> list[Finding]:
        """The findings it adds to `found`, their voxels painted into `label_map` where it is 0."""
        ...


def _refuse_a_stage_alone(card: ModelCard) -> None:
    if not card.runs_alone:
        raise PostprocessError(f"{card.name} runs only as a stage of another model's composition; "
                               "route studies to that model")


class ModelRunner:
    """Runs one registered model on one series with a warm backend (the backends are owned by the caller).

    `stages` run after the model's own segmentation, in order; `probability`, when given, replaces the card's
    `thresholds.probability` for the segmentation (the composed threshold, `ModelCard.stages`). `limits` bound
    the volume it loads and the model grid of the default preprocessor (a given one checks its own).
    """

    def __init__(self, model: RegisteredModel, backend: Backend, blend_mode: str = "gaussian",
                 preprocessor: Preprocessor | None = None, stages: Sequence[LaterStage] = (),
                 probability: float | None = None, limits: VolumeLimits = DEFAULT_LIMITS) -> None:
        self.model = model
        self.backend = backend
        self.blend_mode = blend_mode
        self.limits = limits
        self.preprocessor: Preprocessor = preprocessor or partial(preprocess, limits=limits)  # or e.g. on CUDA
        self.stages = list(stages)
        self.probability = probability

    @property
    def card(self) -> ModelCard:
        """The card postprocessing uses: with the composed threshold, when one is given."""
        return self.model.card.at_probability(self.probability)

    @property
    def algorithms(self) -> list[Algorithm]:
        """Every stage's provenance, the model's own first."""
        return [algorithm_of(self.model.card), *(s.algorithm for s in self.stages)]

    def run(self, paths: Sequence[Path], progress: Callable[[str], None] | None = None) -> InferenceResult:
        """Load, preprocess, infer and postprocess one series; `stage_seconds` has one entry per stage.

        At load, a CT model refuses a series labelled CT whose values are not HU of a body
        (`inference.plausibility.check_ct_values`)."""
        card = self.card
        _refuse_a_stage_alone(card)
        seconds: dict[str, float] = {}
        with _stage("load", seconds):
            volume = load_series(paths, expected_modality=card.modality, limits=self.limits)
            if volume.modality == "CT" and "CT" in card.modality:
                check_ct_values(volume.voxels)
        if progress:
            progress("load")
        return self.run_volume(volume, progress, seconds)

    def run_volume(self, volume: Volume, progress: Callable[[str], None] | None = None,
                   seconds: dict[str, float] | None = None) -> InferenceResult:
        """`run` on a volume already loaded (e.g. a generated NIfTI case, `training.datasets.entry_volume`)."""
        card = self.card
        _refuse_a_stage_alone(card)
        seconds = {} if seconds is None else seconds
        with _stage("preprocess", seconds):
            image, info = self.preprocessor(volume, card)
        if progress:
            progress("preprocess")
        with _stage("infer", seconds):
            logits = model_logits(image, self.backend, card, mode=self.blend_mode)  # type: ignore[arg-type]
            del image
        if progress:
            progress("infer")
        with _stage("postprocess", seconds):
            findings, label_map = postprocess(logits, volume, card, info)
            del logits
            own = algorithm_of(card)
            findings = [replace(f, algorithm=own) for f in findings]
            for stage in self.stages:
                findings = findings + stage.findings(volume, findings, label_map)
            if self.stages:
                findings.sort(key=lambda f: -f.probability)
        log.info("model %s %s on series %s: %d findings; stages %s", card.name, card.version,
                 volume.series_instance_uid, len(findings),
                 {k: round(v, 3) for k, v in seconds.items()})
        return InferenceResult(
            findings=findings,
            label_map=label_map,
            source_sop_instance_uids=list(volume.sop_instance_uids),
            model_name=card.name,
            model_version="+".join([card.version, *(f"{s.algorithm.name}.{s.algorithm.version}"
                                                    for s in self.stages)]),
            weights_sha256=card.weights_sha256,
            stage_seconds=seconds,
            algorithms=self.algorithms,
        )
