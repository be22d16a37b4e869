"""`dxgate train lung-nodule --config FIRST --second-stage SECOND`: both stages of the lung model in one command.

After the first stage's training (`training.train.train`, resumable), the command:

1. registers the first stage provisionally in its run directory (`<run_dir>/first_stage/<name>/`), which the
   second stage's calibration and held-out scoring serve exactly as the gateway would;
2. trains, calibrates and evaluates the second stage (`training.second_stage.train_and_score`, in
   `<run_dir>/second_stage/`, resumable);
3. gives the first stage its own operating point and held-out figures, as served without a second stage, from
   the same scored cases with the blobs left out, so no CT is scored twice;
4. registers both in `register_to`: the first stage, then the second stage naming it.

Phase times (the first stage's training, data generation included, and each second-stage phase) are kept in
`<run_dir>/timings.json` across resumed invocations and written to the second stage's card.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from inference.model_repo import load_model
from training.config import TrainConfig
from training.first_stage import cpu_benchmark, first_stage_fields
from training.register import register_model
from training.run_timings import PhaseTimes
from training.scoring.served import SOURCE_FLOOR, choose_threshold, figures
from training.second_stage import SecondStageConfig, register_second_stage, train_and_score
from training.train import TrainResult

ALONE_METHOD = ("the first stage as the gateway serves it without a second stage (inference.preprocess + model_pass, "
                "components measured on their source-grid voxels above the threshold and held to the card's "
                "thresholds, training.scoring.served.first_stage_findings), swept over its threshold from "
                f"{SOURCE_FLOOR} up and scored by the LUNA16 hit rule (training.scoring.served.served_curve); the "
                "same scored cases as the second stage's figures, without its blobs; threshold chosen on the "
                "calibration scans by the same curve")


def without_blobs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scored cases (`training.scoring.scored_cases.score_case` rows) as the first stage alone reports them."""
    return [{**r, "blobs": [], "diameters": [], "source_index": []} for r in rows]


def train_second_stage_and_register(cfg: TrainConfig, second: SecondStageConfig, second_config: Path,
                                    result: TrainResult, command: str, log: Any = print, progress: bool = False
                                    ) -> dict[str, Any]:
    """Steps 1-4 of the module docstring, after the first stage trained (`result`) by `command`; returns both
    stages' card metrics and, when registered, their folders. The first stage's own calibration and held-out
    sets (`data.n_calibration`, `data.n_test`) are not used: the second stage's are, for both."""
    timings = PhaseTimes(cfg.run_dir / "timings.json")
    timings.record("first_stage_s", result.seconds)     # every invocation of its training, data included
    fields = first_stage_fields(cfg, result, command)
    fields["training"]["second_stage"] = second.name
    provisional = register_model(result.net, fields, cfg.run_dir / "first_stage")
    second = second.model_copy(update={"first_stage": provisional, "run_dir": cfg.run_dir / "second_stage"})
    trained = train_and_score(second, log, progress, timings)

    limits = trained.first_card.thresholds
    cal = trained.calibration
    op = choose_threshold(without_blobs(cal.rows), cal.entries, second.operating_fp_per_scan, SOURCE_FLOOR, limits,
                          second.operating_confidence)
    fields["thresholds"] = {**fields["thresholds"], "probability": op["probability"]}
    figures_dir = Path(tempfile.mkdtemp(prefix="dxgate-figures-"))
    metrics: dict[str, Any] = {
        "operating_point_selection": {**op, "calibration_seeds": [cal.split.seed, cal.split.seed + cal.split.n - 1]},
        "heldout": [], "method": ALONE_METHOD}
    for i, held in enumerate(trained.heldout):
        plot = figures_dir / ("froc.png" if i == 0 else f"froc_{held.split.seed}.png")
        res = figures(without_blobs(held.rows), held.entries, op["probability"], plot,
                      f"{cfg.name} alone: held-out FROC", SOURCE_FLOOR, limits)
        for key in ("candidate_union", "first_stage_alone"):
            res.pop(key)
        res["seconds_per_case"].pop("second_stage")
        res["figure"] = plot.name
        metrics["heldout"].append(res)
        log(f"first stage alone, held-out seeds {res['seeds'][0]}-{res['seeds'][1]}: "
            f"{res['sensitivity_at_1fp_per_scan']:.3f} at 1 FP/scan, CPM {res['cpm']:.3f}")
    if cfg.benchmark:
        metrics["timing"] = cpu_benchmark(result.net, cfg)
    metrics["validation_dice"] = result.best_metric
    fields["metrics"] = metrics
    out: dict[str, Any] = {"first_stage": metrics, "second_stage": trained.metrics}
    if cfg.register_to is None:
        return out
    plots = {r["figure"]: figures_dir / r["figure"] for r in metrics["heldout"]}
    first = register_model(result.net, fields, cfg.register_to, extra_files=plots)
    trained = replace(trained, first_card=load_model(first).card)
    folder = register_second_stage(second, trained, cfg.register_to, command, config=second_config)
    return {**out, "registered": [str(first), str(folder)]}
