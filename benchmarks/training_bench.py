"""Training speed: steps per second of each shipped model's training loop, and the shipped run projected from it.

Each shipped config (training/configs/) runs its real loop from scratch for `--steps` steps: the segmentation
networks through `training.train.train` on `--cases` generated training cases at the shipped resolution, the lung
second stage's classifier through `training.candidate_classifier.train_classifier` on the patches of two generated
CTs. On a GPU (when torch sees one) the networks train under AMP: float16 autocast with a gradient scaler for the
segmentation networks ("amp float16", as their cards say), bfloat16 autocast for the classifier; on a CPU with
bfloat16 (AVX512-BF16 / AMX) under bfloat16 autocast where the config asks for it, else float32. The rate is read
from the run's CSV log over the steps after `--warmup` (the last step, which validates, left out); the projection is
the shipped steps at that rate, the training loop alone (not data generation, calibration or held-out scoring, which
run on the CPU).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks import common

NAME = "training"
CONFIGS = {"lung_nodule_ct": "training/configs/lung_nodule.yaml",
           "spine_vertebrae_ct": "training/configs/spine_vertebrae.yaml"}
CLASSIFIER_CONFIG = "training/configs/lung_nodule_candidates.yaml"
TINY_ROI = (16, 32, 32)          # the phantom's size (CI smoke only)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="steps per model (default 300; tiny 6)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the rate (default 50; tiny 1)")
    p.add_argument("--cases", type=int, default=4, help="generated training cases per segmentation model")
    p.add_argument("--models", nargs="+", default=[*CONFIGS, "lung_nodule_candidates_ct"],
                   choices=[*CONFIGS, "lung_nodule_candidates_ct"], help="which shipped models to time")


def steady_rate(log_csv: Path, warmup: int) -> dict[str, float | int]:
    """Steps per second between step `warmup` and the step before the last (the last one validates)."""
    with log_csv.open(newline="") as fh:
        rows = [(int(r["step"]), float(r["seconds"])) for r in csv.DictReader(fh)]
    if len(rows) < warmup + 3:
        raise ValueError(f"{log_csv}: {len(rows)} steps logged, need more than warmup + 2 = {warmup + 2}")
    (s0, t0), (s1, t1) = rows[warmup - 1] if warmup else (0, 0.0), rows[-2]
    if t1 <= t0:
        raise ValueError(f"{log_csv}: steps {s0}-{s1} took no measurable time; time more steps")
    return {"steps_timed": s1 - s0, "seconds_timed": t1 - t0, "steps_per_s": (s1 - s0) / (t1 - t0),
            "first_step_s": rows[0][1]}


def _measured(device: Any, fn: Any) -> tuple[Any, float, float | None]:
    """Run `fn`; its result, wall seconds and, on a GPU, the peak memory it allocated (MiB)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t0
    return result, wall, (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None)


def segmentation_run(name: str, out: Path, steps: int, warmup: int, cases: int, tiny: bool) -> dict[str, Any]:
    """`steps` of the shipped config's loop on `cases` generated cases (the phantom when `tiny`)."""
    from training.config import load_config
    from training.device import training_device
    from training.train import train, training_precision

    shipped = load_config(common.REPO / CONFIGS[name])
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    data = shipped.data.model_copy(update={"dir": out / "data" / name, "n_train": cases, "n_val": 1, "n_test": 0,
                                           "n_calibration": 0, "phantom": tiny})
    cfg = shipped.model_copy(update={"data": data, "steps": steps, "val_every": steps, "run_dir": run_dir,
                                     "register_to": None,
                                     **({"roi_size": TINY_ROI} if tiny else {})})
    device = training_device()
    result, wall, peak = _measured(device, lambda: train(cfg, progress=False))
    rate = steady_rate(run_dir / "log.csv", warmup)
    return {"model": name, "device": device.type, "precision": training_precision(cfg), "threads": cfg.threads,
            "roi_zyx": list(cfg.roi_size), "spacing_mm": list(cfg.spacing_mm), "cases": cases, "steps": result.step,
            **rate, "wall_s": wall, "peak_gpu_mib": peak, "shipped_steps": shipped.steps,
            "projected_shipped_loop_min": shipped.steps / rate["steps_per_s"] / 60.0}


def classifier_run(out: Path, steps: int, warmup: int, tiny: bool) -> dict[str, Any]:
    """`steps` of the second stage's first round on the patches of its first two CTs."""
    import torch

    from training.candidate_classifier import precision, train_classifier, write_patches
    from training.device import training_device
    from training.second_stage import load_config

    shipped = load_config(common.REPO / CLASSIFIER_CONFIG)
    first = shipped.rounds[0]
    size = {"rows": 128, "slices": 40, "n_neg": 60} if tiny else \
        {"rows": first.rows, "slices": first.slices, "n_neg": first.n_neg}
    pdir = out / "data" / "lung_nodule_candidates_ct" / ("tiny" if tiny else "shipped")
    t0 = time.perf_counter()
    write_patches(pdir, range(first.seeds[0], first.seeds[0] + 2), workers=shipped.workers, log=common.log,
                  nodules=first.nodules, juxtapleural_fraction=first.juxtapleural_fraction, **size)
    patches_s = time.perf_counter() - t0
    ckpt = out / "runs" / "lung_nodule_candidates_ct" / "classifier.pt"
    shutil.rmtree(ckpt.parent, ignore_errors=True)
    ckpt.parent.mkdir(parents=True)
    device = training_device()
    _, wall, peak = _measured(device, lambda: train_classifier(
        [pdir], ckpt, steps=steps, lr=first.lr, seed=shipped.seed, painted=first.painted, log=lambda _: None,
        validate_every=steps))
    rate = steady_rate(ckpt.with_suffix(".csv"), warmup)
    total = sum(r.steps or 0 for r in shipped.rounds)
    return {"model": "lung_nodule_candidates_ct", "device": device.type, "precision": precision(device),
            "threads": torch.get_num_threads(), "roi_zyx": [24, 24, 24], "spacing_mm": [1.0, 1.0, 1.0], "cases": 2,
            "steps": steps, **rate, "wall_s": wall, "patches_s": patches_s, "peak_gpu_mib": peak,
            "shipped_steps": total, "projected_shipped_loop_min": total / rate["steps_per_s"] / 60.0}


def run(args: argparse.Namespace, out: Path, info: dict[str, Any]) -> dict[str, Any]:
    import torch

    steps = args.steps or (6 if args.tiny else 300)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 50)
    if steps < warmup + 3:
        raise SystemExit(f"--steps {steps} must exceed --warmup {warmup} by at least 3")
    cases = 1 if args.tiny else args.cases
    data = common.payload(NAME, info, {"steps": steps, "warmup": warmup, "cases": cases, "tiny": args.tiny,
                                       "models": args.models})
    threads = torch.get_num_threads()   # a config's `threads` sets torch's for the process: not for the next model
    for name in args.models:
        torch.set_num_threads(threads)
        common.log(f"training {name}: {steps} steps")
        if name in CONFIGS:
            row = segmentation_run(name, out, steps, warmup, cases, args.tiny)
        else:
            row = classifier_run(out, steps, warmup, args.tiny)
        common.log(f"{name}: {row['steps_per_s']:.2f} steps/s ({row['device']}, {row['precision']}), shipped loop "
                   f"{row['projected_shipped_loop_min']:.1f} min")
        data["results"].append(row)
    data["summary"] = {r["model"]: {k: r[k] for k in ("device", "precision", "steps_per_s",
                                                       "projected_shipped_loop_min")} for r in data["results"]}
    common.write_json(out / f"{NAME}.json", data)
    columns = ["model", "device", "precision", "threads", "roi_zyx", "steps_timed", "steps_per_s", "first_step_s",
               "peak_gpu_mib", "shipped_steps", "projected_shipped_loop_min"]
    common.write_markdown(out / f"{NAME}.md", "Training speed of the shipped models", data,
                          [("Steady-state rate and the shipped run's loop projected from it",
                            common.md_table(data["results"], columns))])
    common.bar_plot(out / f"{NAME}_steps_per_s.png", [r["model"] for r in data["results"]],
                    [r["steps_per_s"] for r in data["results"]], "steps / s",
                    f"training steps per second ({data['results'][0]['device']})")
    return data
