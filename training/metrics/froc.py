"""LUNA16 FROC analysis and the Competition Performance Metric (CPM).

Rules follow the LUNA16 evaluation script `noduleCADEvaluationLUNA16.py` (evaluateCAD / computeFROC;
Setio et al., "Validation, comparison, and combination of algorithms for automatic detection of pulmonary
nodules in CT images: the LUNA16 challenge", Med Image Anal 42, 2017). Re-implemented here, not copied:

- A candidate hits a nodule when its squared distance to the nodule centre is strictly below the squared
  radius (diameter / 2); a negative diameter counts as 10 mm.
- A nodule hit by several candidates is one true positive with the highest of their probabilities; the
  other candidates are ignored ("double detections"), never false positives. A candidate inside two
  nodules counts for both.
- A candidate hitting no nodule but lying inside an "irrelevant finding" (annotations_excluded.csv,
  our `ignore`) is dropped; every other candidate is a false positive.
- Only the `max_marks` most probable candidates per scan are kept (the script uses 100).
- Curve: over the true-positive entries and false positives, sorted by probability, the FP rate is
  (#FP above threshold) / n_scans and the sensitivity (#TP above threshold) / (#nodules), missed nodules
  included in the denominator (the script's roc_curve scaling reduces to exactly this); the curve starts
  at (0, 0).
- Sensitivity at a given FP rate is linear interpolation of that curve (`np.interp`, as the script
  does over its 0.125..8 grid): above the last point it stays at the final sensitivity, and at an FP rate
  where the curve steps up vertically it takes the top of the step.
- CPM = mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

LUNA16_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
LUNA16_MAX_MARKS = 100
_DEFAULT_DIAMETER_MM = 10.0

Point = Sequence[float]
Prediction = tuple[Point, float]           # (xyz mm, probability)
Truth = tuple[Point, float]                # (xyz mm, diameter mm)


@dataclass(frozen=True)
class ScanMatch:
    """The outcome of matching one scan's candidates against its nodules."""

    nodule_probs: list[float | None]       # per nodule: best hitting probability, None if missed
    fp_probs: list[float]
    n_ignored: int = 0                      # candidates on irrelevant findings
    n_double: int = 0                       # extra candidates on an already-hit nodule


@dataclass(frozen=True)
class FrocResult:
    fps: np.ndarray                         # FP per scan at each threshold (non-decreasing)
    sensitivity: np.ndarray                 # sensitivity at each threshold
    thresholds: np.ndarray                  # probability threshold of each curve point (first is +inf)
    operating_points: tuple[float, ...]
    sensitivities: tuple[float, ...]        # at operating_points
    cpm: float
    n_scans: int
    n_nodules: int
    n_true_positives: int
    n_false_positives: int
    n_ignored: int = 0
    n_double: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    def sensitivity_at(self, fp_per_scan: float) -> float:
        """Interpolated sensitivity at `fp_per_scan` (see module docstring)."""
        if self.n_nodules == 0:
            return float("nan")
        return float(np.interp(fp_per_scan, self.fps, self.sensitivity))

    def to_dict(self) -> dict:
        """JSON-ready summary (curve included as lists)."""
        return {
            "cpm": self.cpm,
            "sensitivity_at_fp": {f"{fp:g}": s for fp, s in zip(self.operating_points, self.sensitivities,
                                                                 strict=True)},
            "n_scans": self.n_scans, "n_nodules": self.n_nodules, "true_positives": self.n_true_positives,
            "false_positives": self.n_false_positives, "ignored_irrelevant": self.n_ignored,
            "ignored_double": self.n_double,
            "curve": {"fps": self.fps.tolist(), "sensitivity": self.sensitivity.tolist()},
        }


def _radius_sq(diameter: float) -> float:
    d = float(diameter)
    return (d if d >= 0 else _DEFAULT_DIAMETER_MM) ** 2 / 4.0


def _top_marks(preds: Sequence[Prediction], max_marks: int | None) -> list[Prediction]:
    """The script's cap: keep marks strictly above the (max_marks+1)-th highest probability."""
    preds = list(preds)
    if max_marks is None or len(preds) <= max_marks:
        return preds
    cut = sorted((float(p) for _, p in preds), reverse=True)[max_marks]
    return [m for m in preds if float(m[1]) > cut][:max_marks]


def match_scan(preds: Sequence[Prediction], truths: Sequence[Truth], ignore: Sequence[Truth] = (),
               max_marks: int | None = LUNA16_MAX_MARKS) -> ScanMatch:
    """Match one scan's candidates to nodules by the LUNA16 rules (module docstring)."""
    marks = _top_marks(preds, max_marks)
    if not marks:
        return ScanMatch([None] * len(truths), [])
    xyz = np.asarray([m[0] for m in marks], dtype=float).reshape(-1, 3)
    prob = np.asarray([m[1] for m in marks], dtype=float)
    used = np.zeros(len(marks), dtype=bool)
    nodule_probs: list[float | None] = []
    n_double = 0
    for centre, diameter in truths:
        hits = np.sum((xyz - np.asarray(centre, dtype=float)) ** 2, axis=1) < _radius_sq(diameter)
        used |= hits
        n_hits = int(hits.sum())
        nodule_probs.append(float(prob[hits].max()) if n_hits else None)
        n_double += max(n_hits - 1, 0)
    ignored = np.zeros(len(marks), dtype=bool)
    for centre, diameter in ignore:
        ignored |= np.sum((xyz - np.asarray(centre, dtype=float)) ** 2, axis=1) < _radius_sq(diameter)
    ignored &= ~used
    fp = ~used & ~ignored
    return ScanMatch(nodule_probs, prob[fp].tolist(), int(ignored.sum()), n_double)


def froc_curve(tp_probs: Sequence[float], fp_probs: Sequence[float], n_nodules: int,
               n_scans: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fps, sensitivity, thresholds) at every distinct probability, starting at (0, 0)."""
    probs = np.concatenate([np.asarray(tp_probs, float), np.asarray(fp_probs, float)])
    is_tp = np.concatenate([np.ones(len(tp_probs)), np.zeros(len(fp_probs))])
    order = np.argsort(-probs, kind="stable")
    probs, is_tp = probs[order], is_tp[order]
    last_of_group = np.r_[np.nonzero(np.diff(probs))[0], len(probs) - 1] if len(probs) else np.array([], int)
    cum_tp = np.cumsum(is_tp)[last_of_group]
    cum_fp = np.cumsum(1 - is_tp)[last_of_group]
    denominator = max(n_nodules, 1)
    fps = np.r_[0.0, cum_fp / n_scans]
    sens = np.r_[0.0, cum_tp / denominator]
    thresholds = np.r_[np.inf, probs[last_of_group]]
    return fps, sens, thresholds


def froc_cpm(predictions: Sequence[Sequence[Prediction]], truths: Sequence[Sequence[Truth]],
             n_scans: int | None = None, ignore: Sequence[Sequence[Truth]] | None = None,
             operating_points: Sequence[float] = LUNA16_FP_RATES,
             max_marks: int | None = LUNA16_MAX_MARKS) -> FrocResult:
    """FROC curve and CPM over scans; `predictions[i]`, `truths[i]` and `ignore[i]` belong to scan i.

    `n_scans` defaults to the number of scans given; scans without predictions still count (a scan list
    shorter than `truths` is padded with empty predictions).
    """
    n = max(len(predictions), len(truths))
    if n_scans is None:
        n_scans = n
    if n_scans < n or n_scans <= 0:
        raise ValueError(f"n_scans={n_scans} is smaller than the {n} scans given (or not positive)")
    if ignore is not None and len(ignore) > n:
        raise ValueError("ignore has more scans than predictions/truths")
    tp_probs: list[float] = []
    fp_probs: list[float] = []
    n_nodules = n_ignored = n_double = 0
    for i in range(n):
        m = match_scan(predictions[i] if i < len(predictions) else (), truths[i] if i < len(truths) else (),
                       ignore[i] if ignore is not None and i < len(ignore) else (), max_marks)
        n_nodules += len(m.nodule_probs)
        tp_probs.extend(p for p in m.nodule_probs if p is not None)
        fp_probs.extend(m.fp_probs)
        n_ignored += m.n_ignored
        n_double += m.n_double
    fps, sens, thresholds = froc_curve(tp_probs, fp_probs, n_nodules, n_scans)
    if n_nodules:
        at = tuple(float(np.interp(fp, fps, sens)) for fp in operating_points)
        cpm = float(np.mean(at))
    else:
        at, cpm = tuple(float("nan") for _ in operating_points), float("nan")
    return FrocResult(fps=fps, sensitivity=sens, thresholds=thresholds, operating_points=tuple(operating_points),
                      sensitivities=at, cpm=cpm, n_scans=n_scans, n_nodules=n_nodules,
                      n_true_positives=len(tp_probs), n_false_positives=len(fp_probs), n_ignored=n_ignored,
                      n_double=n_double)
