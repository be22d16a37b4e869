"""Errors of the inference package. Each keeps its cause when re-raised."""

from __future__ import annotations


class InferenceError(Exception):
    """Base class; `stage` names the pipeline stage that failed (load, preprocess, infer, ...)."""

    stage: str = "infer"


class ModelNotFoundError(InferenceError):
    stage = "load_model"


class ModelCardError(InferenceError):
    """metadata.json, config.pbtxt and the weights disagree or are malformed."""

    stage = "load_model"


class VolumeError(InferenceError):
    """A series cannot become a volume: missing slices, mixed geometry, undecodable pixels."""

    stage = "load"


class WrongModalityError(VolumeError):
    """The series is not of a modality the model reads."""


class BackendError(InferenceError):
    stage = "infer"


class EncodeError(InferenceError):
    stage = "encode"


class ValidationFailedError(InferenceError):
    """An output failed dciodvfy or the highdicom round trip."""

    stage = "validate"
