"""Tianchi / Spark lumbar-spine keypoint metrics.

Follows the competition's public baseline evaluator (`Evaluator.confusion_matrix` / `cal_metrics` in the
spinal_detection_baseline code; re-implemented, not copied):

- A ground-truth point (identification "L1".."L5", "T12-L1".."L5-S1") is hit when a predicted point with
  the same identification lies closer than `max_distance_mm` (6 mm; the test is `distance < 6`).
  Distance is in mm on the annotated slice: pixel offsets scaled by PixelSpacing.
- Missing identifications are "not hit"; points at >= 6 mm are "wrong".
- Disease classification (optional): a hit point adds one count to the confusion matrix cell
  (predicted class, true class) for each of its true classes (a disc may carry "v2,v3"); wrong / not-hit
  points add to their own rows. Keypoint recall = hit counts / all counts; macro F1 averages per-class F1
  over the disc (v1..v5) and vertebra (v1, v2) classes (a class with no counts scores 0; the baseline
  instead adds 1e-5 to every cell, which differs only in such degenerate cases).

Note on PixelSpacing: DICOM orders it (row spacing, column spacing) (PS3.3 C.7.6.2.1.1) and `coord` is
(column, row), so the column offset is scaled by PixelSpacing[1]. The baseline scaled x by its spacing
tuple's first element, which came from SimpleITK (x, y) order: the same physical rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

TIANCHI_MAX_DISTANCE_MM = 6.0
CLASSES = {"disc": ("v1", "v2", "v3", "v4", "v5"), "vertebra": ("v1", "v2")}


@dataclass(frozen=True)
class KeypointResult:
    hit_rate: float                          # hit points / ground-truth points (nan if none)
    n_truth: int
    n_hit: int
    mean_error_mm: float                     # over points predicted with the same identification
    per_tag: dict[str, dict] = field(default_factory=dict)
    errors_mm: tuple[float, ...] = ()
    macro_f1: float | None = None            # only when classes were compared
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"hit_rate": self.hit_rate, "n_truth": self.n_truth, "n_hit": self.n_hit,
                "mean_error_mm": self.mean_error_mm, "macro_f1": self.macro_f1, "per_tag": self.per_tag}


def pixel_distance_mm(a: Sequence[float], b: Sequence[float], pixel_spacing: Sequence[float]) -> float:
    """Distance in mm between two (column, row) pixel points; pixel_spacing is DICOM (row, column)."""
    dx = (float(a[0]) - float(b[0])) * float(pixel_spacing[1])
    dy = (float(a[1]) - float(b[1])) * float(pixel_spacing[0])
    return math.hypot(dx, dy)


def _kind(tag: str) -> str:
    return "disc" if "-" in tag else "vertebra"


def keypoint_hits(pred: Mapping[str, Sequence[float]], truth: Mapping[str, Sequence[float]],
                  max_distance_mm: float = TIANCHI_MAX_DISTANCE_MM,
                  pixel_spacing: Sequence[float] | None = None,
                  pred_classes: Mapping[str, str] | None = None,
                  truth_classes: Mapping[str, Sequence[str]] | None = None) -> KeypointResult:
    """Score one study. Points are mm coordinates (any dimension), or pixels when `pixel_spacing` is given.

    With `pred_classes` (tag -> "v2") and `truth_classes` (tag -> ["v2", "v3"]) the disease confusion
    matrix and macro F1 are computed too.
    """
    per_tag: dict[str, dict] = {}
    errors: list[float] = []
    hits = 0
    outcome: dict[str, str] = {}
    for tag, t in truth.items():
        if tag not in pred:
            per_tag[tag] = {"hit": False, "error_mm": None}
            outcome[tag] = "not_hit"
            continue
        p = pred[tag]
        if pixel_spacing is not None:
            d = pixel_distance_mm(p, t, pixel_spacing)
        else:
            d = math.dist([float(v) for v in p], [float(v) for v in t])
        hit = d < max_distance_mm
        hits += hit
        errors.append(d)
        per_tag[tag] = {"hit": bool(hit), "error_mm": d}
        outcome[tag] = "hit" if hit else "wrong"
    n = len(truth)
    confusion: dict[str, dict[str, int]] = {}
    macro = None
    if pred_classes is not None and truth_classes is not None:
        confusion = _confusion(outcome, pred_classes, truth_classes)
        macro = macro_f1(confusion)
    return KeypointResult(hit_rate=hits / n if n else float("nan"), n_truth=n, n_hit=hits,
                          mean_error_mm=sum(errors) / len(errors) if errors else float("nan"),
                          per_tag=per_tag, errors_mm=tuple(errors), macro_f1=macro, confusion=confusion)


def _columns() -> list[str]:
    return [f"{kind}_{c}" for kind in ("disc", "vertebra") for c in CLASSES[kind]]


def empty_confusion() -> dict[str, dict[str, int]]:
    """rows: predicted class (+ "wrong", "not_hit"); columns: true class."""
    cols = _columns()
    return {row: dict.fromkeys(cols, 0) for row in [*cols, "wrong", "not_hit"]}


def _confusion(outcome: Mapping[str, str], pred_classes: Mapping[str, str],
               truth_classes: Mapping[str, Sequence[str]]) -> dict[str, dict[str, int]]:
    m = empty_confusion()
    for tag, result in outcome.items():
        kind = _kind(tag)
        for c in truth_classes.get(tag, ("v1",)):
            col = f"{kind}_{c}"
            if col not in m["wrong"]:
                raise ValueError(f"unknown {kind} class {c!r} for {tag}")
            if result == "hit":
                row = f"{kind}_{pred_classes.get(tag, 'v1')}"
                if row not in m:
                    raise ValueError(f"unknown predicted {kind} class {pred_classes.get(tag)!r} for {tag}")
            else:
                row = result
            m[row][col] += 1
    return m


def add_confusion(a: dict[str, dict[str, int]], b: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    for row, cols in b.items():
        for col, v in cols.items():
            a[row][col] += v
    return a


def macro_f1(confusion: Mapping[str, Mapping[str, int]]) -> float:
    """Mean over classes of F1, precision = diag / row sum, recall = diag / column sum (0 when empty)."""
    f1s = []
    for col in _columns():
        tp = confusion[col][col]
        row_sum = sum(confusion[col].values())
        col_sum = sum(confusion[r][col] for r in confusion)
        p = tp / row_sum if row_sum else 0.0
        r = tp / col_sum if col_sum else 0.0
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    return sum(f1s) / len(f1s)


def aggregate_keypoints(results: Sequence[KeypointResult]) -> dict:
    """Pooled hit rate and mean error over studies, per tag, and macro F1 of the summed confusion."""
    n_truth = sum(r.n_truth for r in results)
    n_hit = sum(r.n_hit for r in results)
    errors = [e for r in results for e in r.errors_mm]
    per_tag: dict[str, dict] = {}
    for r in results:
        for tag, v in r.per_tag.items():
            s = per_tag.setdefault(tag, {"n_truth": 0, "n_hit": 0})
            s["n_truth"] += 1
            s["n_hit"] += int(v["hit"])
    out = {"hit_rate": n_hit / n_truth if n_truth else float("nan"), "n_truth": n_truth, "n_hit": n_hit,
           "mean_error_mm": sum(errors) / len(errors) if errors else float("nan"),
           "per_tag": {t: {**s, "hit_rate": s["n_hit"] / s["n_truth"]} for t, s in per_tag.items()}}
    with_cm = [r.confusion for r in results if r.confusion]
    if with_cm:
        total = empty_confusion()
        for cm in with_cm:
            add_confusion(total, cm)
        out["macro_f1"] = macro_f1(total)
        out["confusion"] = total
    return out
