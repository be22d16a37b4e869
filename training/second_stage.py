"""`dxgate train lung-nodule-candidates`: train, calibrate, evaluate and register the lung nodule second stage.

One command, resumable (each step skips what its output already holds):

1. patches of generated chest CTs' blob candidates, round 1 (random negatives), `training.candidate_classifier`;
2. `CandidateNet` trained on them;
3. patches of further CTs whose negatives are mostly the ones the round-1 classifier scores highest (hard
   negatives), and the round-1 classifier fine-tuned on both rounds;
4. one threshold for the combination (first-stage components and scored blobs alike) chosen on the calibration
   scans for <= `operating_fp_per_scan` false positives per scan, and the held-out figures, both through the
   gateway's own code (`inference.pipeline`'s first stage, `inference.second_stage`);
5. registration as `models/<name>/` with `first_stage` naming the first-stage model.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from inference.candidates import PATCH_MM
from inference.model_card import ModelCard
from training.candidate_classifier import (
    load_classifier,
    precision,
    train_classifier,
    training_device,
    write_patches,
)
from training.run_timings import PhaseTimes, machine
from training.synthetic.chest_ct import JUXTAPLEURAL_FRACTION

Prediction = tuple[tuple[float, float, float], float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Round(_Strict):
    seeds: tuple[int, int]          # first, last + 1
    minutes: float = Field(gt=0)
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
    threshold_floor: float = 0.3     # the combined threshold is chosen at or above this
    batch_size: int = 128
    register_to: Path | None = Path("models")
    seed: int = 0


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
                  "roi_size": (PATCH_MM,) * 3, "overlap": 0.0, "batch_size": cfg.batch_size},
        "output": {"name": "logits", "activation": "sigmoid", "channels": 1},
        "labels": [label.model_dump() for label in first_card.labels],
        "thresholds": {"probability": probability},
        "series": first_card.series.model_dump(),
        "first_stage": {"model": first_card.name, "probability": first_probability},
    }


# -- evaluation through the served code, one case per call (runs in worker processes) -----------------
_STATE: dict[str, Any] = {}


def _init_worker(first_dir: str, classifier_onnx: str, classifier_card: dict[str, Any]) -> None:
    from inference.backends.onnxruntime_backend import OnnxRuntimeBackend
    from inference.model_repo import load_model

    torch.set_num_threads(1)
    first = load_model(Path(first_dir))
    _STATE["first"] = first
    _STATE["first_backend"] = OnnxRuntimeBackend(first.weights_path, first.name,
                                                 providers=["CPUExecutionProvider"], intra_op_threads=1)
    _STATE["card"] = ModelCard.model_validate(classifier_card)
    _STATE["backend"] = OnnxRuntimeBackend(Path(classifier_onnx), classifier_card["name"],
                                           providers=["CPUExecutionProvider"], intra_op_threads=1)


def score_case(entry: dict[str, Any]) -> dict[str, Any]:
    """First-stage FROC components (model grid, p > 0.05) and every scored blob of one case, plus what the
    served combination reports at the thresholds in the card given to the worker (computed later)."""
    from inference.second_stage import score_candidates
    from training.cli import _infer_case, _model_grid_hu, nodule_candidates

    first, card = _STATE["first"], _STATE["card"]
    t0 = time.perf_counter()
    volume, image, info, logits = _infer_case(entry, first.card, _STATE["first_backend"])
    hu = _model_grid_hu(image, first.card)
    components = nodule_candidates(logits, volume, info, hu=hu, min_mean_hu=first.card.thresholds.min_mean_hu,
                                   max_mean_hu=first.card.thresholds.max_mean_hu)
    t1 = time.perf_counter()
    scored = score_candidates(volume, _STATE["backend"], card)
    t2 = time.perf_counter()
    blobs = [(tuple(float(v) for v in m), float(p))
             for m, p in zip(volume.index_to_patient(scored.source_index), scored.probability, strict=True)]
    return {"seed": entry["seed"], "components": components, "blobs": blobs,
            "diameters": scored.diameter_mm.tolist(), "source_index": scored.source_index.tolist(),
            "first_stage_s": t1 - t0, "second_stage_s": t2 - t1}


def scored_split(entries: list[dict[str, Any]], cache: Path, first_dir: Path, onnx: Path, card: dict[str, Any],
                 workers: int, log: Any = print) -> list[dict[str, Any]]:
    """`score_case` for each entry, cached as one JSON per seed under `cache`."""
    cache.mkdir(parents=True, exist_ok=True)
    todo = [e for e in entries if not (cache / f"{e['seed']}.json").exists()]
    if todo:
        t0 = time.time()
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                 initargs=(str(first_dir), str(onnx), card)) as pool:
            for k, r in enumerate(pool.map(score_case, todo), start=1):
                (cache / f"{r['seed']}.json").write_text(json.dumps(r))
                log(f"scored {cache.name}: {k}/{len(todo)} cases, {time.time() - t0:.0f} s")
    return [json.loads((cache / f"{e['seed']}.json").read_text()) for e in entries]


def _truths(entries: list[dict[str, Any]]) -> list[list[tuple[Any, float]]]:
    return [[(n["centre_mm"], n["diameter_mm"]) for n in e["nodules"]] for e in entries]


def _union(rows: list[dict[str, Any]]) -> list[list[Prediction]]:
    return [[(tuple(c), p) for c, p in r["components"]] + [(tuple(c), p) for c, p in r["blobs"]] for r in rows]


def choose_threshold(rows: list[dict[str, Any]], entries: list[dict[str, Any]], fp_per_scan: float,
                     floor: float) -> dict[str, Any]:
    """The lowest threshold (>= floor) of the combined candidates with <= fp_per_scan FP per calibration scan."""
    from training.cli import threshold_at
    from training.metrics.froc import froc_cpm

    froc = froc_cpm(_union(rows), _truths(entries))
    return {**threshold_at(froc, fp_per_scan, floor), "calibration_scans": len(entries), "calibration_cpm": froc.cpm}


def served_findings(row: dict[str, Any], threshold: float) -> list[Prediction]:
    """What the gateway reports for a scored case at `threshold`: first-stage components above it (model grid)
    plus the blobs `inference.second_stage.kept_candidates` keeps beside them."""
    from inference.second_stage import SUPPRESS_MM, kept_candidates

    first = [(np.asarray(c), p) for c, p in row["components"] if p > threshold]
    taken = [(c, SUPPRESS_MM + 2.0) for c, _ in first]   # components have no diameter here: 2 mm radius assumed
    out: list[Prediction] = [(tuple(float(v) for v in c), p) for c, p in first]
    if row["blobs"]:
        mm = np.asarray([c for c, _ in row["blobs"]], dtype=float)
        prob = np.asarray([p for _, p in row["blobs"]], dtype=float)
        out += [(tuple(float(v) for v in mm[k]), float(prob[k])) for k in kept_candidates(mm, prob, threshold, taken)]
    return out


def figures(rows: list[dict[str, Any]], entries: list[dict[str, Any]], threshold: float,
            plot: Path | None = None, title: str = "") -> dict[str, Any]:
    """FROC / CPM of the combination, the first stage alone, and the operating point as served."""
    from training.metrics.froc import froc_cpm
    from training.metrics.plots import plot_froc

    truths = _truths(entries)
    both = froc_cpm(_union(rows), truths)
    alone = froc_cpm([[(tuple(c), p) for c, p in r["components"]] for r in rows], truths)
    served = [served_findings(r, threshold) for r in rows]
    at = froc_cpm(served, truths)
    if plot is not None:
        plot_froc(both, plot, title=title)
    sizes = {"3-6 mm": (3, 6), "6-10 mm": (6, 10), "10-30 mm": (10, 31)}
    found: dict[str, list[int]] = {k: [0, 0] for k in sizes}
    for preds, e in zip(served, entries, strict=True):
        for n in e["nodules"]:
            k = next(k for k, (lo, hi) in sizes.items() if lo <= n["diameter_mm"] < hi)
            found[k][1] += 1
            c, r = np.asarray(n["centre_mm"]), n["diameter_mm"] / 2
            found[k][0] += any(np.linalg.norm(np.asarray(p) - c) <= r for p, _ in preds)
    return {
        "cases": len(entries), "seeds": [entries[0]["seed"], entries[-1]["seed"]], "n_nodules": both.n_nodules,
        "sensitivity_at_1fp_per_scan": both.sensitivity_at(1.0), "cpm": both.cpm,
        "sensitivity_at_fp": dict(zip([f"{f:g}" for f in both.operating_points], both.sensitivities, strict=True)),
        "first_stage_alone": {"sensitivity_at_1fp_per_scan": alone.sensitivity_at(1.0), "cpm": alone.cpm},
        "operating_point": {"probability": threshold, "sensitivity": at.n_true_positives / max(at.n_nodules, 1),
                            "fp_per_scan": at.n_false_positives / max(len(entries), 1),
                            "found_by_size": {k: f"{a}/{b}" for k, (a, b) in found.items()}},
        "seconds_per_case": {"first_stage": float(np.mean([r["first_stage_s"] for r in rows])),
                             "second_stage": float(np.mean([r["second_stage_s"] for r in rows]))},
    }


def _classifier_card_for_scoring(cfg: SecondStageConfig, first_card: ModelCard) -> dict[str, Any]:
    return {**card_fields(cfg, first_card, 0.5, 0.5), "version": "eval", "weights_sha256": "0" * 64}


def run(cfg: SecondStageConfig, config_path: Path, log: Any = print) -> dict[str, Any]:
    """Every step of the module docstring; returns the card's metrics (and the model folder, when registered)."""
    from inference.model_repo import load_model
    from training.datasets import generate_dataset
    from training.export import export_onnx
    from training.register import register_model
    torch.manual_seed(cfg.seed)
    device = training_device()
    first = load_model(cfg.first_stage)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    timings = PhaseTimes(cfg.run_dir / "timings.json")
    steps: list[int] = []          # a round trains for minutes, so its steps depend on the machine: recorded
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
                res = train_classifier(list(dirs), ckpt, rnd.minutes, lr=rnd.lr, seed=cfg.seed,
                                       init=previous if rnd.hard else None, painted=rnd.painted, log=log)
            done.write_text(json.dumps(res))
        steps.append(int(json.loads(done.read_text())["steps"]))
        previous = ckpt
    assert previous is not None
    net = load_classifier(previous).eval()
    train_seconds = sum(v for k, v in timings.items() if k.startswith(("patches_", "train_")))
    onnx = cfg.run_dir / "classifier.onnx"
    export_onnx(net, torch.zeros(1, 1, PATCH_MM, PATCH_MM, PATCH_MM), onnx)
    scoring_card = _classifier_card_for_scoring(cfg, first.card)

    def split(s: Split) -> list[dict[str, Any]]:
        return generate_dataset("lung-nodule", s.dir, s.section, s.n, s.seed, rows=s.rows, slices=s.slices,
                                progress=False)

    with timings.phase("calibration_s"):
        cal = split(cfg.calibration)
        cal_rows = scored_split(cal, cfg.run_dir / "scores" / "calibration", cfg.first_stage, onnx, scoring_card,
                                cfg.workers, log)
    op = choose_threshold(cal_rows, cal, cfg.operating_fp_per_scan, cfg.threshold_floor)
    log(f"operating point: {json.dumps(op)}")
    figures_dir = Path(tempfile.mkdtemp(prefix="dxgate-figures-"))
    metrics: dict[str, Any] = {"operating_point": op, "heldout": []}
    for i, s in enumerate(cfg.test):
        with timings.phase(f"heldout_{s.seed}_s"):
            entries = split(s)
            rows = scored_split(entries, cfg.run_dir / "scores" / f"{s.section}_{s.seed}", cfg.first_stage, onnx,
                                scoring_card, cfg.workers, log)
        plot = figures_dir / ("froc.png" if i == 0 else f"froc_{s.seed}.png")
        res = figures(rows, entries, op["probability"], plot, f"{cfg.name} with {first.name}: held-out FROC")
        res["figure"] = plot.name
        metrics["heldout"].append(res)
        log(f"held-out seeds {s.seed}-{s.seed + s.n - 1}: {json.dumps(res)}")
    metrics["method"] = ("first stage as served (inference.preprocess + model_pass; FROC components at p > 0.05 on "
                         "the model grid, training.cli.nodule_candidates) plus every blob of inference.candidates "
                         "scored by the exported ONNX classifier (inference.second_stage.score_candidates); LUNA16 "
                         "FROC (training.metrics.froc); one threshold for both, chosen on the calibration scans")
    fields = card_fields(cfg, first.card, op["probability"], op["probability"])
    fields["training"] = {
        "data": "synthetic", "generator": "training.synthetic.chest_ct",
        "nodules_per_ct": [r.nodules for r in cfg.rounds],
        "rounds": [r.model_dump() for r in cfg.rounds],
        "calibration_seeds": [cfg.calibration.seed, cfg.calibration.seed + cfg.calibration.n - 1],
        "network": "training.candidate_classifier.CandidateNet (0.18 M parameters)",
        "first_stage": {"name": first.name, "version": first.version, "weights_sha256": first.card.weights_sha256},
        "command": f"dxgate train lung-nodule-candidates --config {config_path}",
        "train_seconds": round(train_seconds), "timings_s": {k: round(v) for k, v in timings.items()},
        "command_seconds": round(timings.total()), "steps_per_round": steps,
        "device": device.type, "precision": precision(device), "measured_on": machine(),
    }
    fields["metrics"] = metrics
    if cfg.register_to is None:
        return metrics
    extra = {r["figure"]: figures_dir / r["figure"] for r in metrics["heldout"]}
    rng = np.random.default_rng(0)
    folder = register_model(net, fields, cfg.register_to, extra_files=extra,
                            parity_inputs=[rng.random((4, 1, PATCH_MM, PATCH_MM, PATCH_MM), dtype=np.float32)])
    return {**metrics, "registered": str(folder)}


def train_command(config: Path) -> int:
    """`dxgate train lung-nodule-candidates --config FILE`; returns a process exit status."""
    try:
        cfg = load_config(config)
    except (OSError, ValueError) as exc:
        print(f"dxgate train: cannot read {config}: {exc}", file=sys.stderr)
        return 2
    if not (cfg.first_stage / "metadata.json").is_file():
        print(f"dxgate train: first stage {cfg.first_stage} is not a model folder", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(json.dumps(run(cfg, config, log=lambda s: print(s, flush=True)), indent=1))
    return 0
