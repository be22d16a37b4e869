"""How the lung nodule second stage is scored: what the gateway would report for each held-out case.

`score_case` runs one generated CT through the gateway's own first stage (`inference.preprocess`, `model_pass`)
and candidate scoring (`inference.second_stage.score_candidates`) and keeps every first-stage component (with
its diameter at `DIAMETER_LEVELS`) and every scored blob. `served_findings` turns such a row into the findings
the gateway reports at a threshold (a blob beside a finding is the same nodule, `candidate_groups`);
`served_curve` sweeps that threshold and scores each output by the LUNA16 hit rule. The threshold of the model
card is chosen on calibration scans by the same curve (`choose_threshold`).
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.model_card import ModelCard
from training.metrics.froc import LUNA16_FP_RATES

Prediction = tuple[tuple[float, float, float], float]

# Probability levels at which each first-stage component's diameter is measured (`score_case`): the gateway
# measures a finding at the threshold it applies, and suppresses blobs within that finding's radius + 4 mm.
DIAMETER_LEVELS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999)
COMPONENT_RADIUS_MM = 2.0    # a component without measured diameters (rows scored before they were kept)


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
    from training.cli import _infer_case, _model_grid_hu, nodule_components

    first, card = _STATE["first"], _STATE["card"]
    t0 = time.perf_counter()
    volume, image, info, logits = _infer_case(entry, first.card, _STATE["first_backend"])
    hu = _model_grid_hu(image, first.card)
    components = nodule_components(logits, volume, info, hu=hu, min_mean_hu=first.card.thresholds.min_mean_hu,
                                   max_mean_hu=first.card.thresholds.max_mean_hu, levels=DIAMETER_LEVELS)
    t1 = time.perf_counter()
    scored = score_candidates(volume, _STATE["backend"], card)
    t2 = time.perf_counter()
    blobs = [(tuple(float(v) for v in m), float(p))
             for m, p in zip(volume.index_to_patient(scored.source_index), scored.probability, strict=True)]
    return {"seed": entry["seed"], "components": [(c, p) for c, p, _ in components],
            "component_diameters": [d for _, _, d in components], "diameter_levels": list(DIAMETER_LEVELS),
            "blobs": blobs,
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


def _component_radius(row: dict[str, Any], k: int, threshold: float) -> float:
    """Radius (mm) of first-stage component `k` of a scored case as the gateway measures it at `threshold`
    (its diameter interpolated between `DIAMETER_LEVELS`)."""
    levels, diameters = row.get("diameter_levels"), row.get("component_diameters")
    if not levels or not diameters:
        return COMPONENT_RADIUS_MM
    return float(np.interp(threshold, levels, diameters[k])) / 2.0


def served_findings(row: dict[str, Any], threshold: float, min_diameter_mm: float = 0.0) -> list[Prediction]:
    """What the gateway reports for a scored case at `threshold`: first-stage components above it (model grid)
    that measure at least `min_diameter_mm` there (the first stage's `thresholds.min_diameter_mm`; not applied
    to rows without measured diameters), plus one mark per group of blobs beside them
    (`inference.second_stage.candidate_groups`: outside each component's radius at that threshold +
    `SUPPRESS_MM`), at the group's `group_centre`, as `add_candidate_findings` reports them."""
    from inference.second_stage import SUPPRESS_MM, candidate_groups, group_centre

    measured = bool(row.get("component_diameters"))
    first = [(k, np.asarray(c), p) for k, (c, p) in enumerate(row["components"])
             if p > threshold and not (measured and 2.0 * _component_radius(row, k, threshold) < min_diameter_mm)]
    taken = [(c, _component_radius(row, k, threshold) + SUPPRESS_MM) for k, c, _ in first]
    out: list[Prediction] = [(tuple(float(v) for v in c), p) for _, c, p in first]
    if row["blobs"]:
        mm = np.asarray([c for c, _ in row["blobs"]], dtype=float)
        prob = np.asarray([p for _, p in row["blobs"]], dtype=float)
        groups = candidate_groups(mm, prob, threshold, taken, np.asarray(row["diameters"], dtype=float))
        out += [(tuple(float(v) for v in group_centre(mm, prob, g)), float(prob[g[0]])) for g in groups]
    return out


@dataclass(frozen=True)
class ServedCurve:
    """The gateway's output swept over its threshold: at each distinct probability >= the floor (descending),
    false positives per scan and sensitivity of `served_findings`, counted by the LUNA16 hit rule
    (`training.metrics.froc.match_scan`: a mark within a nodule's radius hits it; further marks on a hit nodule
    are neither hits nor false positives)."""

    thresholds: np.ndarray
    fps: np.ndarray
    sensitivity: np.ndarray
    n_nodules: int
    n_scans: int
    operating_points: tuple[float, ...] = LUNA16_FP_RATES

    @property
    def sensitivities(self) -> tuple[float, ...]:
        return tuple(self.sensitivity_at(f) for f in self.operating_points)

    def sensitivity_at(self, fp_per_scan: float) -> float:
        """The highest sensitivity of a threshold with at most `fp_per_scan` false positives per scan."""
        ok = self.fps <= fp_per_scan
        return float(self.sensitivity[ok].max()) if ok.any() else 0.0

    @property
    def cpm(self) -> float:
        return float(np.mean(self.sensitivities))


def served_curve(rows: list[dict[str, Any]], entries: list[dict[str, Any]], floor: float,
                 max_fp_per_scan: float = max(LUNA16_FP_RATES), min_diameter_mm: float = 0.0) -> ServedCurve:
    """`ServedCurve` of scored cases against their generated nodules, down to the first threshold with more than
    `max_fp_per_scan` false positives per scan (lower ones cannot change the sensitivity at that rate or below).
    `min_diameter_mm` as in `served_findings`."""
    from training.metrics.froc import match_scan

    truths = _truths(entries)
    probs = {float(p) for r in rows for _, p in [*r["components"], *r["blobs"]] if p >= floor}
    ts = np.asarray(sorted(probs, reverse=True), dtype=float)
    fps, sens = np.zeros(len(ts)), np.zeros(len(ts))
    n = sum(len(t) for t in truths)
    for i, t in enumerate(ts):
        tp = fp = 0
        for r, truth in zip(rows, truths, strict=True):
            # the gateway keeps first-stage voxels at p > threshold and blobs at p >= threshold
            m = match_scan(served_findings(r, float(np.nextafter(t, -np.inf)), min_diameter_mm), truth,
                           max_marks=None)
            tp += sum(p is not None for p in m.nodule_probs)
            fp += len(m.fp_probs)
        fps[i], sens[i] = fp / max(len(rows), 1), tp / max(n, 1)
        if fps[i] > max_fp_per_scan:
            ts, fps, sens = ts[: i + 1], fps[: i + 1], sens[: i + 1]
            break
    return ServedCurve(ts, fps, sens, n, len(rows))


def choose_threshold(rows: list[dict[str, Any]], entries: list[dict[str, Any]], fp_per_scan: float,
                     floor: float, min_diameter_mm: float = 0.0) -> dict[str, Any]:
    """The lowest threshold (>= floor) at which the gateway's output (`served_curve`) has at most `fp_per_scan`
    false positives per calibration scan at it and at every higher threshold: halfway between the lowest
    probability kept and the next one down."""
    curve = served_curve(rows, entries, floor, max(fp_per_scan, *LUNA16_FP_RATES), min_diameter_mm)
    over = np.flatnonzero(curve.fps > fp_per_scan)
    k = (int(over[0]) if over.size else len(curve.thresholds)) - 1    # last point before the first one over
    kept = float(curve.thresholds[k]) if k >= 0 else 1.0
    dropped = float(curve.thresholds[k + 1]) if k + 1 < len(curve.thresholds) else floor
    threshold = float(np.clip(0.5 * (kept + dropped), floor, 1.0 - 1e-6))
    return {"probability": threshold, "target_fp_per_scan": fp_per_scan,
            "calibration_fp_per_scan": float(curve.fps[k]) if k >= 0 else 0.0,
            "calibration_sensitivity": float(curve.sensitivity[k]) if k >= 0 else 0.0,
            "calibration_nodules": curve.n_nodules, "calibration_scans": len(entries),
            "calibration_cpm": curve.cpm}


def figures(rows: list[dict[str, Any]], entries: list[dict[str, Any]], threshold: float,
            plot: Path | None = None, title: str = "", floor: float = 0.3, min_diameter_mm: float = 0.0
            ) -> dict[str, Any]:
    """Held-out figures: the FROC / CPM of the gateway's output swept over its threshold (`served_curve`, the
    headline), of the raw candidate union (every component and blob a mark, no suppression), of the first stage
    alone, and the operating point as served at `threshold`."""
    from training.metrics.froc import froc_cpm
    from training.metrics.plots import plot_froc

    truths = _truths(entries)
    curve = served_curve(rows, entries, floor, min_diameter_mm=min_diameter_mm)
    both = froc_cpm(_union(rows), truths)
    alone = froc_cpm([[(tuple(c), p) for c, p in r["components"]] for r in rows], truths)
    served = [served_findings(r, threshold, min_diameter_mm) for r in rows]
    at = froc_cpm(served, truths)
    if plot is not None:
        plot_froc(curve, plot, title=title)
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
        "sensitivity_at_1fp_per_scan": curve.sensitivity_at(1.0), "cpm": curve.cpm,
        "sensitivity_at_fp": {f"{f:g}": s for f, s in zip(curve.operating_points, curve.sensitivities, strict=True)},
        "candidate_union": {"sensitivity_at_1fp_per_scan": both.sensitivity_at(1.0), "cpm": both.cpm,
                            "sensitivity_at_fp": dict(zip([f"{f:g}" for f in both.operating_points],
                                                          both.sensitivities, strict=True))},
        "first_stage_alone": {"sensitivity_at_1fp_per_scan": alone.sensitivity_at(1.0), "cpm": alone.cpm},
        "operating_point": {"probability": threshold, "sensitivity": at.n_true_positives / max(at.n_nodules, 1),
                            "fp_per_scan": at.n_false_positives / max(len(entries), 1),
                            "found_by_size": {k: f"{a}/{b}" for k, (a, b) in found.items()}},
        "seconds_per_case": {"first_stage": float(np.mean([r["first_stage_s"] for r in rows])),
                             "second_stage": float(np.mean([r["second_stage_s"] for r in rows]))},
    }


METHOD = ("first stage as served (inference.preprocess + model_pass; components at p > 0.05 on the model grid with "
          "their diameters at the threshold, training.cli.nodule_components; those under the first stage's "
          "min_diameter_mm there dropped) plus every blob of inference.candidates "
          "scored by the exported ONNX classifier (inference.second_stage.score_candidates); the gateway's findings "
          "at each threshold (components above it, blob groups of inference.second_stage.candidate_groups at their "
          "probability-weighted centres) scored by the LUNA16 hit rule (training.second_stage_eval.served_curve): "
          "sensitivity at 1 FP/scan and CPM of that curve; candidate_union is the LUNA16 FROC of every component "
          "and blob as a mark, without suppression; one threshold for both stages, chosen on the calibration scans "
          "by the same curve")
