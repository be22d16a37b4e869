"""Errors of the training package; `dxgate.main` prints them and exits with status 2."""

from __future__ import annotations


class TrainingError(Exception):
    """A recipe, dataset or model folder the training pipeline cannot use; the message names it."""


class LoaderError(TrainingError, ValueError):
    """A dataset folder or file is missing, malformed, or not in the format its loader reads."""
