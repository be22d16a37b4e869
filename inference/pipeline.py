"""One model, run in-process: DICOM series -> volume -> preprocess -> backend -> postprocess -> result."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from inference.backends.base import Backend
from inference.errors import BackendError, InferenceError, VolumeError
from inference.findings import InferenceResult
from inference.model_card import ModelCard
from inference.model_pass import model_logits
from inference.model_repo import RegisteredModel
from inference.postprocess import PostprocessError, postprocess
from inference.preprocess import PreprocessError, ResampleInfo, preprocess
from inference.second_stage import SecondStage
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
    except Exception as exc:
        raise _STAGE_ERRORS[name](f"{name}: {type(exc).__name__}: {exc}") from exc
    finally:
        seconds[name] = time.perf_counter() - start


def _refuse_second_stage(card: ModelCard) -> None:
    if card.postprocess == "candidates":
        raise PostprocessError(f"{card.name} is a second stage of {card.first_stage.model}; "  # type: ignore[union-attr]
                               "route studies to that model")


class ModelRunner:
    """Runs one registered model on one series with a warm backend (the backend is owned by the caller)."""

    def __init__(self, model: RegisteredModel, backend: Backend, blend_mode: str = "gaussian",
                 preprocessor: Preprocessor | None = None, second_stage: SecondStage | None = None) -> None:
        self.model = model
        self.backend = backend
        self.blend_mode = blend_mode
        self.preprocessor: Preprocessor = preprocessor or preprocess   # e.g. DevicePreprocessor on CUDA
        self.second_stage = second_stage   # lung nodules: scored blob candidates added to the findings

    @property
    def card(self) -> ModelCard:
        """The card postprocessing uses: with a second stage, the first stage's threshold is the combined one."""
        card = self.model.card
        if self.second_stage is None:
            return card
        first = self.second_stage.card.first_stage
        return card.model_copy(update={"thresholds": card.thresholds.model_copy(
            update={"probability": first.probability})})  # type: ignore[union-attr]

    def run(self, paths: Sequence[Path], progress: Callable[[str], None] | None = None) -> InferenceResult:
        """Load, preprocess, infer and postprocess one series; `stage_seconds` has one entry per stage."""
        card = self.card
        _refuse_second_stage(card)
        seconds: dict[str, float] = {}
        with _stage("load", seconds):
            volume = load_series(paths, expected_modality=card.modality)
        if progress:
            progress("load")
        return self.run_volume(volume, progress, seconds)

    def run_volume(self, volume: Volume, progress: Callable[[str], None] | None = None,
                   seconds: dict[str, float] | None = None) -> InferenceResult:
        """`run` on a volume already loaded (e.g. a generated NIfTI case, `training.datasets.entry_volume`)."""
        card = self.card
        _refuse_second_stage(card)
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
            if self.second_stage is not None:
                findings = findings + self.second_stage.findings(volume, findings, label_map)
                findings.sort(key=lambda f: -f.probability)
        log.info("model %s %s on series %s: %d findings; stages %s", card.name, card.version,
                 volume.series_instance_uid, len(findings),
                 {k: round(v, 3) for k, v in seconds.items()})
        return InferenceResult(
            findings=findings,
            label_map=label_map,
            source_sop_instance_uids=list(volume.sop_instance_uids),
            model_name=card.name,
            model_version=card.version if self.second_stage is None else
            f"{card.version}+{self.second_stage.card.name}.{self.second_stage.card.version}",
            weights_sha256=card.weights_sha256,
            stage_seconds=seconds,
            second_stage=None if self.second_stage is None else self.second_stage.algorithm,
        )
