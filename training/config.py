"""The first-stage training recipe (`training/configs/lung_nodule.yaml`, `spine_vertebrae.yaml`): one YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inference.model_card import check_flip_axes
from training.transforms import SPINE_LEVELS

Task = Literal["lung-nodule", "spine-vertebrae"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(StrictModel):
    dir: Path                                # datasets/<name>/generated
    n_train: int = Field(ge=1)
    n_val: int = Field(default=2, ge=1)
    n_test: int = Field(default=20, ge=0)
    seed: int = 1000                         # training cases use seed .. seed + n_train - 1
    val_seed: int = 5000
    test_seed: int = 9000                    # held-out cases: never overlaps the training seeds
    rows: int = 512
    test_rows: int | None = None             # held-out resolution (default: rows)
    n_calibration: int = Field(default=0, ge=0)  # operating-point scans (at test_rows), never trained on
    calibration_seed: int = 6000
    slices: int | None = None                # generated CT length (None: the generator's; set only for tests)
    phantom: bool = False                    # tiny built-in phantom (tests only)


class TrainConfig(StrictModel):
    task: Task
    name: str
    data: DataConfig
    spacing_mm: tuple[float, float, float]
    window: tuple[float, float]
    roi_size: tuple[int, int, int]
    overlap: float = 0.25
    flips: list[tuple[int, ...]] = []        # the card's test-time flips (inference.model_pass), used in evaluation
    channels: tuple[int, ...] = (8, 16, 32, 64)
    num_res_units: int = 1
    steps: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=1, ge=1)      # volumes per step
    num_samples: int = Field(default=2, ge=1)     # patches per volume
    pos: float = 1.0
    neg: float = 1.0
    lr: float = 2e-3
    weight_decay: float = 1e-5
    val_every: int = 100
    seed: int = 0
    threads: int | None = None
    run_dir: Path = Path("training/runs/default")
    register_to: Path | None = None
    resume: bool = True
    probability: float = 0.5
    insert_nodules: float = 0.0              # lung: probability of painting an extra nodule into a patch
    operating_fp_per_scan: float | None = Field(default=None, gt=0)  # lung: threshold chosen on calibration
    hard_voxel_fraction: float | None = Field(default=None, gt=0.0, le=1.0)  # lung: BCE over the hardest voxels only
    cpu_bf16: bool = False                    # CPU: bfloat16 autocast + channels-last (where the CPU has bf16)
    benchmark: bool = True                    # time the exported model on a 300 x 512 x 512 chest CT grid

    _flip_axes = field_validator("flips")(check_flip_axes)   # refused before training, not at registration

    @model_validator(mode="after")
    def _roi_fits_the_network(self) -> TrainConfig:
        factor = 2 ** (len(self.channels) - 1)
        if any(r % factor for r in self.roi_size):
            raise ValueError(f"roi_size {self.roi_size} must be divisible by {factor} ({len(self.channels)} levels)")
        return self

    @property
    def out_channels(self) -> int:
        return 1 if self.task == "lung-nodule" else 1 + len(SPINE_LEVELS)


def load_config(path: Path) -> TrainConfig:
    """Read a YAML training config."""
    return TrainConfig.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
