"""VerSe vertebra identification rate (id.rate) and localisation distance.

Definitions follow the VerSe benchmark (Sekuboyina et al., "VerSe: A Vertebrae labelling and
segmentation benchmark for multi-detector CT images", Med Image Anal 73, 2021) and its reference code
`utils/eval_utilities.py::get_hits` in github.com/anjany/verse (re-implemented, not copied):

- Only labels present in both the ground truth and the prediction take part in the nearest-centroid test.
- A ground-truth vertebra is identified when, among those predicted centroids, the closest one to its
  ground-truth centroid carries the same label and lies within 20 mm (distance <= 20 mm).
- id.rate of a scan = identified / number of ground-truth vertebrae (missing predictions count as
  misses). Over a dataset we report both the mean of per-scan rates and the pooled rate.
- Localisation distance = distance between the ground-truth and the predicted centroid of the same
  label, for every label present in both (VerSe's d_mean), averaged.

Coordinates are patient mm (evaluation in physical space, as VerSe evaluated at 1 mm isotropic).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

VERSE_MAX_DISTANCE_MM = 20.0

Labelled = tuple[Hashable, Sequence[float]]   # (label, xyz mm)


@dataclass(frozen=True)
class IdRate:
    rate: float                              # identified / n_truth (nan when n_truth == 0)
    mean_error_mm: float                     # mean localisation distance over matched labels (nan if none)
    n_truth: int
    n_identified: int
    per_label: dict[str, dict] = field(default_factory=dict)   # label -> {"identified": bool, "error_mm": ..}
    errors_mm: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return {"id_rate": self.rate, "mean_error_mm": self.mean_error_mm, "n_truth": self.n_truth,
                "n_identified": self.n_identified, "per_label": self.per_label}


def _as_table(items: Sequence[Labelled], what: str) -> dict[Hashable, np.ndarray]:
    table: dict[Hashable, np.ndarray] = {}
    for label, xyz in items:
        if label in table:
            raise ValueError(f"{what}: label {label!r} appears twice")
        table[label] = np.asarray(xyz, dtype=float).reshape(3)
    return table


def identification_rate(pred: Sequence[Labelled], truth: Sequence[Labelled],
                        max_distance_mm: float = VERSE_MAX_DISTANCE_MM) -> IdRate:
    """id.rate and localisation error of one scan (module docstring)."""
    gt = _as_table(truth, "truth")
    pr = _as_table(pred, "prediction")
    common = [lab for lab in gt if lab in pr]
    per_label: dict[str, dict] = {str(lab): {"identified": False, "error_mm": None} for lab in gt}
    errors: list[float] = []
    hits = 0
    if common:
        pred_xyz = np.stack([pr[lab] for lab in common])
        for lab in common:
            d = np.linalg.norm(pred_xyz - gt[lab], axis=1)
            own = float(np.linalg.norm(pr[lab] - gt[lab]))
            identified = common[int(np.argmin(d))] == lab and own <= max_distance_mm
            hits += identified
            errors.append(own)
            per_label[str(lab)] = {"identified": bool(identified), "error_mm": own}
    n = len(gt)
    return IdRate(rate=hits / n if n else float("nan"),
                  mean_error_mm=float(np.mean(errors)) if errors else float("nan"),
                  n_truth=n, n_identified=hits, per_label=per_label, errors_mm=tuple(errors))


def aggregate_id_rates(results: Sequence[IdRate]) -> dict:
    """Dataset summary: mean of per-scan id.rates, pooled id.rate, mean localisation error, per label."""
    scored = [r for r in results if r.n_truth]
    errors = [e for r in results for e in r.errors_mm]
    n_truth = sum(r.n_truth for r in results)
    n_hit = sum(r.n_identified for r in results)
    per_label: dict[str, dict] = {}
    for r in results:
        for lab, v in r.per_label.items():
            s = per_label.setdefault(lab, {"n_truth": 0, "n_identified": 0, "errors_mm": []})
            s["n_truth"] += 1
            s["n_identified"] += int(v["identified"])
            if v["error_mm"] is not None:
                s["errors_mm"].append(v["error_mm"])
    summary_per_label = {
        lab: {"id_rate": s["n_identified"] / s["n_truth"], "n_truth": s["n_truth"],
              "mean_error_mm": float(np.mean(s["errors_mm"])) if s["errors_mm"] else None}
        for lab, s in per_label.items()
    }
    return {
        "id_rate": float(np.mean([r.rate for r in scored])) if scored else float("nan"),
        "id_rate_pooled": n_hit / n_truth if n_truth else float("nan"),
        "mean_error_mm": float(np.mean(errors)) if errors else float("nan"),
        "n_scans": len(results), "n_truth": n_truth, "n_identified": n_hit,
        "per_label": summary_per_label,
    }


def errors_by_label(results: Sequence[IdRate]) -> dict[str, list[float]]:
    """Localisation errors (mm) per vertebra label over scans, for the error plot."""
    errors: dict[str, list[float]] = {}
    for r in results:
        for label, v in r.per_label.items():
            if v["error_mm"] is not None:
                errors.setdefault(str(label), []).append(float(v["error_mm"]))
    return errors
