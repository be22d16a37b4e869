"""The lung pair's output as the gateway reports it, from scored cases (`training.scoring.scored_cases` rows).

`served_findings` turns such a row into the findings the gateway reports at a threshold (components measured
there as the gateway measures them and held to the first stage's `thresholds`; a blob beside a finding is the
same nodule, `inference.second_stage.candidate_groups`); `served_curve` sweeps that threshold and scores each
output by the LUNA16 hit rule. The threshold of the model card is chosen on calibration scans by the same curve
(`choose_threshold`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import chi2

from inference.model_card import Thresholds
from inference.postprocess import source_components, sphere_diameter_mm
from inference.second_stage import SUPPRESS_MM, candidate_groups, group_centre
from training.metrics.froc import LUNA16_FP_RATES, froc_cpm, match_scan
from training.metrics.plots import plot_froc
from training.scoring.heldout import truths_of

Prediction = tuple[tuple[float, float, float], float]

SOURCE_FLOOR = 0.3           # source voxels kept per component: the lowest threshold the evaluation sweeps
COMPONENT_RADIUS_MM = 2.0    # a component without measured voxels (rows scored before they were kept)


def source_voxels(prob: np.ndarray, info: Any, volume: Any, labels: np.ndarray, ids: list[int],
                  floor: float = SOURCE_FLOOR) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """What the gateway's postprocess thresholds, for each first-stage component `ids` of `labels`
    (`training.scoring.cases.component_labels`): the probabilities of its source-grid voxels above `floor` (the linear
    interpolation of `inference.postprocess.source_components`), descending, with their HU and patient positions
    (mm) in the same order.
    Each interpolated component belongs to the model-grid component under its most probable voxel (all labelled
    corners of one interpolation cell are 26-neighbours, one component); where a component's interpolation falls
    apart above `floor`, its most probable part is kept."""
    scale = np.asarray(info.source_spacing, dtype=float) / np.asarray(info.target_spacing, dtype=float)
    last = np.asarray(labels.shape) - 1
    wanted, out = set(ids), {}
    for box, mask, local in source_components(prob, info, volume.shape, floor):
        values = local[mask]
        j = int(np.argmax(values))
        index = np.argwhere(mask) + [b.start for b in box]
        corner = np.clip(np.floor(index[j] * scale).astype(int), 0, last)
        k = int(labels[tuple(slice(c, min(c + 2, t + 1)) for c, t in zip(corner, last, strict=True))].max())
        if k not in wanted or (k in out and out[k][0][0] >= values[j]):
            continue
        order = np.argsort(-values, kind="stable")
        out[k] = (values[order], np.asarray(volume.voxels[box][mask], dtype=np.float32)[order],
                  volume.index_to_patient(index[order].astype(float)))
    return out


def _union(rows: list[dict[str, Any]]) -> list[list[Prediction]]:
    return [[(tuple(c), p) for c, p in r["components"]] + [(tuple(c), p) for c, p in r["blobs"]] for r in rows]


@dataclass(frozen=True)
class ServedCase:
    """A scored case (`score_case` row) as `served_findings` reads it: first-stage components with their source
    voxels' probabilities (descending) and running sums of their HU and positions, when the row has them, and the
    scored blobs."""

    centres: np.ndarray                     # [n, 3] mm, the components' model-grid centres
    maxima: np.ndarray                      # [n] model-grid maxima (what rows without source voxels report)
    probs: list[np.ndarray] | None          # per component, source voxel probabilities above SOURCE_FLOOR
    hu_sums: list[np.ndarray] | None        # per component, running sums of those voxels' HU ...
    mm_sums: list[np.ndarray] | None        # ... and of their positions [m, 3] (mm)
    voxel_mm3: float
    blob_mm: np.ndarray
    blob_probability: np.ndarray
    blob_diameters: np.ndarray

    @classmethod
    def of(cls, row: dict[str, Any] | ServedCase) -> ServedCase:
        if isinstance(row, ServedCase):
            return row
        measured = "component_probs" in row
        return cls(
            centres=np.asarray([c for c, _ in row["components"]], dtype=float).reshape(-1, 3),
            maxima=np.asarray([p for _, p in row["components"]], dtype=float),
            probs=[np.asarray(v, dtype=float) for v in row["component_probs"]] if measured else None,
            hu_sums=[np.cumsum(np.asarray(v, dtype=float)) for v in row["component_hu"]] if measured else None,
            mm_sums=[np.cumsum(np.asarray(v, dtype=float).reshape(-1, 3), axis=0) for v in row["component_mm"]]
            if measured else None,
            voxel_mm3=float(row.get("source_voxel_mm3", 0.0)),
            blob_mm=np.asarray([c for c, _ in row["blobs"]], dtype=float).reshape(-1, 3),
            blob_probability=np.asarray([p for _, p in row["blobs"]], dtype=float),
            blob_diameters=np.asarray(row["diameters"], dtype=float))

    def kept(self, k: int, count: np.ndarray | int, limits: Thresholds | None) -> np.ndarray:
        """Whether component `k` measured on its `count` most probable source voxels passes the first stage's
        `limits` (min_diameter_mm, min_volume_mm3, min/max_mean_hu), as `inference.postprocess.nodules`."""
        assert self.hu_sums is not None
        count = np.asarray(count)
        ok = count > 0
        if limits is None:
            return ok
        volume = count * self.voxel_mm3
        ok &= (volume >= limits.min_volume_mm3) & (sphere_diameter_mm(volume) >= limits.min_diameter_mm)
        if limits.min_mean_hu is not None or limits.max_mean_hu is not None:
            mean_hu = self.hu_sums[k][np.maximum(count, 1) - 1] / np.maximum(count, 1)
            ok &= mean_hu >= (limits.min_mean_hu if limits.min_mean_hu is not None else -np.inf)
            ok &= mean_hu <= (limits.max_mean_hu if limits.max_mean_hu is not None else np.inf)
        return ok

    def changes(self, limits: Thresholds | None) -> list[float]:
        """The probabilities at which a component's finding appears or goes as the threshold passes them."""
        if self.probs is None:
            return self.maxima.tolist()
        out: list[float] = []
        for k, values in enumerate(self.probs):
            if not len(values):
                continue
            ok = self.kept(k, np.arange(len(values) + 1), limits)
            out += values[np.flatnonzero(ok[1:] != ok[:-1])].tolist()
        return out


def first_stage_findings(case: ServedCase, threshold: float, limits: Thresholds | None = None
                         ) -> list[tuple[np.ndarray, float, float]]:
    """(centre mm, probability, radius mm) of the first-stage findings the gateway reports at `threshold`: each
    component's source voxels above it, measured and held to `limits` (the first stage's `thresholds`) as the
    gateway's postprocess does, at their centroid. Rows without source voxels report components whose model-grid
    maximum exceeds the threshold at their model-grid centre with a `COMPONENT_RADIUS_MM` radius, without limits."""
    if case.probs is None or case.mm_sums is None:
        return [(case.centres[k], float(p), COMPONENT_RADIUS_MM) for k, p in enumerate(case.maxima) if p > threshold]
    out = []
    for k, values in enumerate(case.probs):
        count = int(np.searchsorted(-values, -threshold, side="left"))      # voxels above the threshold
        if count and bool(case.kept(k, count, limits)):
            out.append((case.mm_sums[k][count - 1] / count, float(values[0]),
                        float(sphere_diameter_mm(count * case.voxel_mm3)) / 2.0))
    return out


def served_findings(row: dict[str, Any] | ServedCase, threshold: float, limits: Thresholds | None = None
                    ) -> list[Prediction]:
    """What the gateway reports for a scored case at `threshold`: the `first_stage_findings` (`limits`: the first
    stage's `thresholds`), plus one mark per group of blobs beside them (`inference.second_stage.candidate_groups`:
    outside each finding's radius + `SUPPRESS_MM`), at the group's `group_centre`, as `add_candidate_findings`
    reports them."""
    case = ServedCase.of(row)
    first = first_stage_findings(case, threshold, limits)
    out: list[Prediction] = [(tuple(float(v) for v in c), p) for c, p, _ in first]
    if len(case.blob_probability):
        groups = candidate_groups(case.blob_mm, case.blob_probability, threshold,
                                  [(c, r + SUPPRESS_MM) for c, _, r in first], case.blob_diameters)
        out += [(tuple(float(v) for v in group_centre(case.blob_mm, case.blob_probability, g)),
                 float(case.blob_probability[g[0]])) for g in groups]
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
                 max_fp_per_scan: float = max(LUNA16_FP_RATES), limits: Thresholds | None = None) -> ServedCurve:
    """`ServedCurve` of scored cases against their generated nodules, down to the first threshold with more than
    `max_fp_per_scan` false positives per scan (lower ones cannot change the sensitivity at that rate or below).
    The thresholds are where a mark appears or goes (blob probabilities, `ServedCase.changes`); `limits` as in
    `served_findings`."""
    truths = truths_of(entries)
    cases = [ServedCase.of(r) for r in rows]
    probs = {float(p) for c in cases for p in [*c.changes(limits), *c.blob_probability.tolist()] if p >= floor}
    ts = np.asarray(sorted(probs, reverse=True), dtype=float)
    fps, sens = np.zeros(len(ts)), np.zeros(len(ts))
    n = sum(len(t) for t in truths)
    for i, t in enumerate(ts):
        tp = fp = 0
        for case, truth in zip(cases, truths, strict=True):
            # the gateway keeps first-stage voxels at p > threshold and blobs at p >= threshold
            m = match_scan(served_findings(case, float(np.nextafter(t, -np.inf)), limits), truth, max_marks=None)
            tp += sum(p is not None for p in m.nodule_probs)
            fp += len(m.fp_probs)
        fps[i], sens[i] = fp / max(len(rows), 1), tp / max(n, 1)
        if fps[i] > max_fp_per_scan:
            ts, fps, sens = ts[: i + 1], fps[: i + 1], sens[: i + 1]
            break
    return ServedCurve(ts, fps, sens, n, len(rows))


def false_positive_budget(scans: int, fp_per_scan: float, confidence: float) -> int:
    """The most false positives `scans` calibration scans may show for the rate on unseen scans to be at most
    `fp_per_scan` with one-sided `confidence`: the largest count whose exact (Garwood, chi-squared) Poisson upper
    confidence bound is <= fp_per_scan * scans, or 0 when too few scans bound the rate even with none.
    10 scans, 1 FP/scan, 0.9: 5 (bound 9.27; 6 would give 10.53)."""
    n = 0
    while chi2.ppf(confidence, 2 * (n + 2)) / 2 <= fp_per_scan * scans:
        n += 1
    return n


def choose_threshold(rows: list[dict[str, Any]], entries: list[dict[str, Any]], fp_per_scan: float,
                     floor: float, limits: Thresholds | None = None, confidence: float | None = None
                     ) -> dict[str, Any]:
    """The lowest threshold (>= floor) at which the gateway's output (`served_curve`) has at most `fp_per_scan`
    false positives per calibration scan at it and at every higher threshold: halfway between the lowest
    probability kept and the next one down. With `confidence`, at most `false_positive_budget` of them over the
    calibration scans instead, so that unseen scans stay under `fp_per_scan` with that confidence (a handful of
    calibration scans estimates the rate only roughly)."""
    target = fp_per_scan
    budget: int | None = None
    if confidence is not None:
        budget = false_positive_budget(len(entries), fp_per_scan, confidence)
        target = budget / max(len(entries), 1)
    curve = served_curve(rows, entries, floor, max(target, *LUNA16_FP_RATES), limits)
    over = np.flatnonzero(curve.fps > target + 1e-9)
    k = (int(over[0]) if over.size else len(curve.thresholds)) - 1    # last point before the first one over
    kept = float(curve.thresholds[k]) if k >= 0 else 1.0
    dropped = float(curve.thresholds[k + 1]) if k + 1 < len(curve.thresholds) else floor
    threshold = float(np.clip(0.5 * (kept + dropped), floor, 1.0 - 1e-6))
    return {"probability": threshold, "target_fp_per_scan": fp_per_scan,
            **({"confidence": confidence, "calibration_fp_budget": budget} if confidence is not None else {}),
            "calibration_fp_per_scan": float(curve.fps[k]) if k >= 0 else 0.0,
            "calibration_sensitivity": float(curve.sensitivity[k]) if k >= 0 else 0.0,
            "calibration_nodules": curve.n_nodules, "calibration_scans": len(entries),
            "calibration_cpm": curve.cpm}


def figures(rows: list[dict[str, Any]], entries: list[dict[str, Any]], threshold: float,
            plot: Path | None = None, title: str = "", floor: float = SOURCE_FLOOR, limits: Thresholds | None = None
            ) -> dict[str, Any]:
    """Held-out figures: the FROC / CPM of the gateway's output swept over its threshold (`served_curve`, the
    headline), of the raw candidate union (every component and blob a mark, no suppression), of the first stage
    alone, and the operating point as served at `threshold`."""
    truths = truths_of(entries)
    curve = served_curve(rows, entries, floor, limits=limits)
    both = froc_cpm(_union(rows), truths)
    alone = froc_cpm([[(tuple(c), p) for c, p in r["components"]] for r in rows], truths)
    served = [served_findings(r, threshold, limits) for r in rows]
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


METHOD = ("first stage as served (inference.preprocess + model_pass; components at p > 0.05 on the model grid, "
          "training.scoring.cases.nodule_components, each measured at the threshold on its source-grid voxels as the "
          "gateway's postprocess measures them and held to the first stage's thresholds, training.scoring.served."
          "first_stage_findings) plus every blob of inference.candidates "
          "scored by the exported ONNX classifier (inference.second_stage.score_candidates); the gateway's findings "
          "at each threshold (components above it, blob groups of inference.second_stage.candidate_groups at their "
          "odds-weighted centres) scored by the LUNA16 hit rule (training.scoring.served.served_curve): "
          "sensitivity at 1 FP/scan and CPM of that curve; candidate_union is the LUNA16 FROC of every component "
          "and blob as a mark, without suppression; one threshold for both stages, chosen on the calibration scans "
          "by the same curve")
