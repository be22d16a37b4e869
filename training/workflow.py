"""What `dxgate train` runs: generate data, train, score held-out, export to ONNX and register.

- `train_model(task, config)`: a first stage (`lung-nodule`, `spine-vertebrae`) trained (`training.train`), scored
  and registered (`training.first_stage`); with `second_stage` (lung only), both stages of the lung model in one
  command (`training.lung_model`);
- `train_second_stage(config)`: the lung model's second stage alone, next to a registered first stage
  (`training.second_stage`).

Both raise `training.errors.TrainingError` for a config they cannot use, before anything is trained, and return
what they registered with its figures.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from training.config import TrainConfig, load_config
from training.errors import TrainingError
from training.first_stage import score_and_register
from training.lung_model import train_second_stage_and_register
from training.second_stage import SecondStageConfig, run
from training.second_stage import load_config as load_second_stage_config
from training.train import train


def _log(line: str) -> None:
    print(line, flush=True)


def _first_stage_config(task: str, config: Path) -> TrainConfig:
    try:
        cfg = load_config(config)
    except (OSError, ValidationError, ValueError) as exc:
        raise TrainingError(f"cannot read {config}: {exc}") from exc
    if task != cfg.task:
        raise TrainingError(f"task {task!r} does not match the config's task {cfg.task!r}")
    return cfg


def _second_stage_config(config: Path) -> SecondStageConfig:
    try:
        return load_second_stage_config(config)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot read {config}: {exc}") from exc


def train_model(task: str, config: Path, second_stage: Path | None = None) -> dict[str, Any]:
    """`dxgate train TASK --config CONFIG [--second-stage SECOND]`: one training task end to end.

    With `second_stage` (a `dxgate train lung-nodule-candidates` config), the lung command goes on to train,
    calibrate, evaluate and register the second stage with the first (`training.lung_model`)."""
    cfg = _first_stage_config(task, config)
    command = f"dxgate train {task} --config {config}"
    second = None
    if second_stage is not None:
        if cfg.task != "lung-nodule":
            raise TrainingError(f"--second-stage: only the lung-nodule task has one, not {cfg.task}")
        second = _second_stage_config(second_stage)
        command += f" --second-stage {second_stage}"
    result = train(cfg)
    if second is not None:
        assert second_stage is not None
        return train_second_stage_and_register(cfg, second, second_stage, result, command, log=_log,
                                               progress=sys.stderr.isatty())
    return score_and_register(cfg, result, command)


def train_second_stage(config: Path) -> dict[str, Any]:
    """`dxgate train lung-nodule-candidates --config CONFIG`: the second stage beside its registered first stage."""
    cfg = _second_stage_config(config)
    if not (cfg.first_stage / "metadata.json").is_file():
        raise TrainingError(f"first stage {cfg.first_stage} is not a model folder")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return run(cfg, config, log=_log, progress=sys.stderr.isatty())
