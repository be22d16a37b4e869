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


class ModelRunner:
    """Runs one registered model on one series with a warm backend (the backend is owned by the caller)."""

    def __init__(self, model: RegisteredModel, backend: Backend, blend_mode: str = "gaussian",
                 preprocessor: Preprocessor | None = None) -> None:
        self.model = model
        self.backend = backend
        self.blend_mode = blend_mode
        self.preprocessor: Preprocessor = preprocessor or preprocess   # e.g. DevicePreprocessor on CUDA

    def run(self, paths: Sequence[Path], progress: Callable[[str], None] | None = None) -> InferenceResult:
        """Load, preprocess, infer and postprocess one series; `stage_seconds` has one entry per stage."""
        card = self.model.card
        seconds: dict[str, float] = {}
        with _stage("load", seconds):
            volume = load_series(paths, expected_modality=card.modality)
        if progress:
            progress("load")
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
        log.info("model %s %s on series %s: %d findings; stages %s", card.name, card.version,
                 volume.series_instance_uid, len(findings),
                 {k: round(v, 3) for k, v in seconds.items()})
        return InferenceResult(
            findings=findings,
            label_map=label_map,
            source_sop_instance_uids=list(volume.sop_instance_uids),
            model_name=card.name,
            model_version=card.version,
            weights_sha256=card.weights_sha256,
            stage_seconds=seconds,
        )
