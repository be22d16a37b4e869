"""`dxgate train lung-nodule-candidates`: train, calibrate, evaluate and register the lung nodule second stage.

One command, resumable (each step skips what its output already holds):

1. patches of generated chest CTs' blob candidates, round 1 (random negatives), `training.candidate_classifier`;
2. `CandidateNet` trained on them for the round's steps (or minutes), with a CSV log and a checkpoint to resume
   from every 200 steps (`train_classifier`);
3. patches of further CTs whose negatives are mostly the ones the round-1 classifier scores highest (hard
   negatives), and the round-1 classifier fine-tuned on both rounds;
4. one threshold for the combination (first-stage components and scored blobs alike) chosen on the calibration
   scans for <= `operating_fp_per_scan` false positives per scan (with `operating_confidence`, that sure of it on
   unseen scans: `training.scoring.served.false_positive_budget`), and the held-out figures, both through the
   gateway's own code (`inference.pipeline`'s first stage, `inference.second_stage`) and both on what the
   gateway reports at each threshold (`training.scoring.served`: a blob beside a finding is the same nodule),
   with the config's test-time `flips` (written to the card's input);
5. registration as `models/<name>/`, declared as a later stage in the first-stage model's card
   (`training.register.declare_candidate_stage`).

Steps 1-4 are `train_and_score`, step 5 `register_second_stage`; `training.lung_model` runs them after training the
first stage, for `dxgate train lung-nodule --second-stage CONFIG`; `training.workflow` is where both commands start.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inference.candidates import PATCH_MM
from inference.model_card import ModelCard, check_flip_axes
from inference.model_repo import load_model
from training.candidate_classifier import (
    load_classifier,
    precision,
    train_classifier,
    write_patches,
)
from training.datasets import generate_dataset
from training.device import training_device
from training.export import export_onnx
from training.register import declare_candidate_stage, register_model
from training.run_timings import PhaseTimes, machine
from training.scoring.scored_cases import scored_split
from training.scoring.served import METHOD, choose_threshold, figures
from training.synthetic.chest_ct import JUXTAPLEURAL_FRACTION


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Round(_Strict):
    seeds: tuple[int, int]          # first, last + 1
    steps: int | None = Field(default=None, gt=0)      # a budget of steps: the same weights on every run ...
    minutes: float | None = Field(default=None, gt=0)  # ... or of wall time (the steps depend on the machine)
    lr: float = Field(gt=0)
    hard: bool = False              # negatives mined with the previous round's classifier; fine-tunes it
    rows: int = 512                 # generated CT size (smaller only for tests)
    slices: int | None = None
    n_neg: int = 700
    nodules: int = Field(default=8, ge=1)   # nodules generated per CT
    juxtapleural_fraction: float = Field(default=JUXTAPLEURAL_FRACTION, ge=0.0, le=1.0)  # of them on the pleura
    painted: int = Field(default=0, ge=0, le=48)   # negatives per 64-patch batch given a painted nodule (positives)


class Split(_Strict):
    dir: Path
    section: str
    n: int = Field(ge=1)
    seed: int
    rows: int = 512
    slices: int | None = None       # generated CT length (None: the generator's; set only for tests)


class SecondStageConfig(_Strict):
    task: str = "lung-nodule-candidates"
    name: str = "lung_nodule_candidates_ct"
    first_stage: Path = Path("models/lung_nodule_ct")
    run_dir: Path
    rounds: list[Round]
    workers: int = Field(default=2, ge=1)
    calibration: Split
    test: list[Split] = []
    operating_fp_per_scan: float = 1.0
    operating_confidence: float | None = Field(default=None, gt=0, lt=1)   # ... on unseen scans, this sure
    threshold_floor: float = 0.3     # the combined threshold is chosen at or above this
    batch_size: int = 128
    flips: list[tuple[int, ...]] = []    # test-time flips of the patch (inference.second_stage), in the card
    flip_screen: float = Field(default=0.0, ge=0, lt=1)   # ... for candidates the plain pass scores at least this
    register_to: Path | None = Path("models")
    seed: int = 0

    _flip_axes = field_validator("flips")(check_flip_axes)

    @model_validator(mode="after")
    def _one_budget(self) -> SecondStageConfig:
        for k, r in enumerate(self.rounds, start=1):
            if (r.steps is None) == (r.minutes is None):
                raise ValueError(f"round {k}: give either steps or minutes")
        return self


def load_config(path: Path) -> SecondStageConfig:
    return SecondStageConfig.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})


def card_fields(cfg: SecondStageConfig, first_card: ModelCard, probability: float, first_probability: float
                ) -> dict[str, Any]:
    """Model-card fields of the second stage (everything but version and weights_sha256)."""
    return {
        "name": cfg.name,
        "task": "lung-nodule-candidate-classification",
        "description": "Second stage of lung nodule detection in chest CT: blob candidates (scale-normalised LoG "
        "on the CT at 1 mm, inference.candidates) scored by a small 3-D CNN on a 24 mm patch; those at or above "
        f"the threshold that {first_card.name} did not find are added to its findings.",
        "modality": ["CT"], "body_part": ["CHEST"], "postprocess": "candidates",
        "input": {"name": "image", "spacing_mm": (1.0, 1.0, 1.0), "window": (-1000.0, 400.0),
                  "roi_size": (PATCH_MM,) * 3, "overlap": 0.0, "batch_size": cfg.batch_size,
                  "flips": [list(a) for a in cfg.flips], "flip_screen": cfg.flip_screen},
        "output": {"name": "logits", "activation": "sigmoid", "channels": 1},
        "labels": [label.model_dump() for label in first_card.labels],
        "thresholds": {"probability": probability},
        "series": first_card.series.model_dump(),
    }


@dataclass
class ScoredSplit:
    """A calibration or held-out split with its scored cases (`training.scoring.scored_cases.score_case` rows)."""

    split: Split
    entries: list[dict[str, Any]]
    rows: list[dict[str, Any]]


@dataclass
class Trained:
    """What `train_and_score` returns: the last round's classifier, its scored splits and the pair's figures."""

    net: torch.nn.Module
    first_card: ModelCard
    operating_point: dict[str, Any]
    calibration: ScoredSplit
    heldout: list[ScoredSplit]
    metrics: dict[str, Any]          # the second stage's card metrics (held-out figures of the pair)
    figures_dir: Path
    steps: list[int]
    timings: PhaseTimes


def train_rounds(cfg: SecondStageConfig, log: Any, progress: bool, timings: PhaseTimes) -> tuple[Path, list[int]]:
    """Steps 1-3 of the module docstring, each round's patches and classifier skipped where already there; returns
    the last round's checkpoint and the steps of each round."""
    steps: list[int] = []          # recorded: with a budget in minutes they depend on the machine
    dirs: list[Path] = []
    previous: Path | None = None
    for k, rnd in enumerate(cfg.rounds, start=1):
        pdir, ckpt = cfg.run_dir / f"patches_{k}", cfg.run_dir / f"classifier_{k}.pt"
        with timings.phase(f"patches_{k}_s"):
            write_patches(pdir, range(*rnd.seeds), hard=previous if rnd.hard else None, workers=cfg.workers,
                          log=log, rows=rnd.rows, slices=rnd.slices, n_neg=rnd.n_neg, nodules=rnd.nodules,
                          juxtapleural_fraction=rnd.juxtapleural_fraction)
        dirs.append(pdir)
        done = ckpt.with_suffix(".json")
        if not done.exists():
            with timings.phase(f"train_{k}_s"):
                res = train_classifier(list(dirs), ckpt, rnd.steps, rnd.minutes, lr=rnd.lr, seed=cfg.seed,
                                       init=previous if rnd.hard else None, painted=rnd.painted, log=log,
                                       progress=progress)
            done.write_text(json.dumps(res))
        steps.append(int(json.loads(done.read_text())["steps"]))
        previous = ckpt
    assert previous is not None
    return previous, steps


def score_split(cfg: SecondStageConfig, s: Split, name: str, onnx: Path, scoring_card: dict[str, Any],
                log: Any) -> ScoredSplit:
    """A split generated (or reused) and each of its cases scored as served (`scored_split`, cached by seed)."""
    entries = generate_dataset("lung-nodule", s.dir, s.section, s.n, s.seed, rows=s.rows, slices=s.slices,
                               progress=False, workers=cfg.workers)
    rows = scored_split(entries, cfg.run_dir / "scores" / name, cfg.first_stage, onnx, scoring_card, cfg.workers, log)
    return ScoredSplit(s, entries, rows)


def train_and_score(cfg: SecondStageConfig, log: Any = print, progress: bool = False,
                    timings: PhaseTimes | None = None) -> Trained:
    """Steps 1-4 of the module docstring (resumable); `timings` (default: the run directory's) gets each phase."""
    torch.manual_seed(cfg.seed)
    first = load_model(cfg.first_stage)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    timings = timings if timings is not None else PhaseTimes(cfg.run_dir / "timings.json")
    last, steps = train_rounds(cfg, log, progress, timings)
    net = load_classifier(last).eval()
    onnx = cfg.run_dir / "classifier.onnx"
    export_onnx(net, torch.zeros(1, 1, PATCH_MM, PATCH_MM, PATCH_MM), onnx)
    scoring_card = {**card_fields(cfg, first.card, 0.5, 0.5), "version": "eval", "weights_sha256": "0" * 64}
    with timings.phase("calibration_s"):
        cal = score_split(cfg, cfg.calibration, "calibration", onnx, scoring_card, log)
    op = choose_threshold(cal.rows, cal.entries, cfg.operating_fp_per_scan, cfg.threshold_floor,
                          first.card.thresholds, cfg.operating_confidence)
    log(f"operating point: {json.dumps(op)}")
    figures_dir = Path(tempfile.mkdtemp(prefix="dxgate-figures-"))
    metrics: dict[str, Any] = {"operating_point": op, "heldout": []}
    heldout = []
    for i, s in enumerate(cfg.test):
        with timings.phase(f"heldout_{s.seed}_s"):
            held = score_split(cfg, s, f"{s.section}_{s.seed}", onnx, scoring_card, log)
        heldout.append(held)
        plot = figures_dir / ("froc.png" if i == 0 else f"froc_{s.seed}.png")
        res = figures(held.rows, held.entries, op["probability"], plot,
                      f"{cfg.name} with {first.name}: held-out FROC", cfg.threshold_floor, first.card.thresholds)
        res["figure"] = plot.name
        metrics["heldout"].append(res)
        log(f"held-out seeds {s.seed}-{s.seed + s.n - 1}: {json.dumps(res)}")
    metrics["method"] = METHOD
    return Trained(net, first.card, op, cal, heldout, metrics, figures_dir, steps, timings)


def training_record(cfg: SecondStageConfig, trained: Trained, command: str, config: Path) -> dict[str, Any]:
    """The card's `training` section: data, rounds, network, first stage, command and the second stage's config
    file, phase times, machine."""
    device = training_device()
    timings = trained.timings
    first = trained.first_card
    train_seconds = sum(v for k, v in timings.items() if k.startswith(("patches_", "train_")))
    return {
        "data": "synthetic", "generator": "training.synthetic.chest_ct",
        "nodules_per_ct": [r.nodules for r in cfg.rounds],
        "rounds": [r.model_dump() for r in cfg.rounds],
        "calibration_seeds": [cfg.calibration.seed, cfg.calibration.seed + cfg.calibration.n - 1],
        "network": "training.candidate_classifier.CandidateNet (0.18 M parameters)",
        "first_stage": {"name": first.name, "version": first.version, "weights_sha256": first.weights_sha256},
        "command": command, "config": str(config),
        "train_seconds": round(train_seconds), "timings_s": {k: round(v) for k, v in timings.items()},
        "command_seconds": round(timings.total()), "steps_per_round": trained.steps,
        "device": device.type, "precision": precision(device), "measured_on": machine(),
    }


def register_second_stage(cfg: SecondStageConfig, trained: Trained, register_to: Path, command: str,
                          config: Path) -> Path:
    """Register the classifier as `register_to/<name>/` with its card and the held-out FROC plots beside it, and
    declare it the candidate stage of `register_to/<first stage>/` (`command` trained it; `config` is its config
    file)."""
    probability = trained.operating_point["probability"]
    fields = card_fields(cfg, trained.first_card, probability, probability)
    fields["training"] = training_record(cfg, trained, command, config)
    fields["metrics"] = trained.metrics
    extra = {r["figure"]: trained.figures_dir / r["figure"] for r in trained.metrics["heldout"]}
    rng = np.random.default_rng(0)
    folder = register_model(trained.net, fields, register_to, extra_files=extra,
                            parity_inputs=[rng.random((4, 1, PATCH_MM, PATCH_MM, PATCH_MM), dtype=np.float32)])
    declare_candidate_stage(register_to / trained.first_card.name, cfg.name, probability, probability)
    return folder


def run(cfg: SecondStageConfig, config_path: Path, log: Any = print, progress: bool = False) -> dict[str, Any]:
    """Every step of the module docstring; returns the card's metrics (and the model folder, when registered)."""
    trained = train_and_score(cfg, log, progress)
    if cfg.register_to is None:
        return trained.metrics
    folder = register_second_stage(cfg, trained, cfg.register_to,
                                   f"dxgate train lung-nodule-candidates --config {config_path}", config_path)
    return {**trained.metrics, "registered": str(folder)}
