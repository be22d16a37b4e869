"""Findings of a registered model scored against a datalist's ground truth, and the report they go into.

Ground truth per entry, in patient LPS mm:
- nodule models: "nodules": [[x, y, z, diameter_mm], ...] (or [{"centre_mm": [..], "diameter_mm": d}]),
  optional "excluded" (irrelevant findings, same form) -> LUNA16 FROC / CPM (`training.metrics.froc`);
- vertebra models: "centroids": [[label, x, y, z], ...] with VerSe labels or names (or
  "vertebrae": [{"label"/"index": .., "centroid_mm": [..]}]) -> VerSe id.rate and localisation error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from training.errors import LoaderError
from training.loaders.verse import VERTEBRA_NAMES
from training.metrics.froc import FrocResult, froc_cpm
from training.metrics.plots import plot_errors, plot_froc
from training.metrics.vertebrae import (
    VERSE_MAX_DISTANCE_MM,
    aggregate_id_rates,
    errors_by_label,
    identification_rate,
)


def _xyz(v: Sequence[Any]) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def truth_nodules(entry: Mapping[str, Any], key: str = "nodules") -> list[tuple[tuple[float, float, float], float]]:
    """[(centre xyz mm, diameter mm)] from either datalist form."""
    out = []
    for n in entry.get(key) or []:
        if isinstance(n, Mapping):
            out.append((_xyz(n["centre_mm"]), float(n["diameter_mm"])))
        else:
            out.append((_xyz(n[:3]), float(n[3])))
    return out


def vertebra_name(label: Any) -> str:
    """VerSe int label (or its string) -> name ("L3"); names pass through."""
    text = str(label).strip()
    if text.lstrip("-").isdigit():
        try:
            return VERTEBRA_NAMES[int(text)]
        except KeyError as exc:
            raise LoaderError(f"unknown VerSe vertebra label {label!r}") from exc
    return text


def truth_centroids(entry: Mapping[str, Any]) -> list[tuple[str, tuple[float, float, float]]]:
    """[(name, xyz mm)] from "centroids" [[label, x, y, z]] or "vertebrae" [{label|index, centroid_mm}]."""
    if entry.get("centroids") is not None:
        return [(vertebra_name(c[0]), _xyz(c[1:4])) for c in entry["centroids"]]
    out = []
    for v in entry.get("vertebrae") or []:
        label = v.get("index", v.get("label"))
        out.append((vertebra_name(label), _xyz(v["centroid_mm"])))
    return out


def score_nodules(findings: Sequence[Sequence[Any]], entries: Sequence[Mapping[str, Any]]) -> tuple[dict, FrocResult]:
    """FROC/CPM of per-case findings (objects with .centre_mm and .probability) against the entries."""
    if len(findings) != len(entries):
        raise ValueError("one findings list per datalist entry is required")
    preds = [[(_xyz(f.centre_mm), float(f.probability)) for f in case] for case in findings]
    truths = [truth_nodules(e) for e in entries]
    ignore = [truth_nodules(e, "excluded") for e in entries]
    result = froc_cpm(preds, truths, n_scans=len(entries), ignore=ignore)
    return result.to_dict(), result


def score_vertebrae(findings: Sequence[Sequence[Any]], entries: Sequence[Mapping[str, Any]],
                    max_distance_mm: float = VERSE_MAX_DISTANCE_MM) -> tuple[dict, dict[str, list[float]]]:
    """VerSe id.rate of per-case findings (objects with .label and .centre_mm); also errors by label.

    When a model reports one label twice, the more probable finding is kept.
    """
    if len(findings) != len(entries):
        raise ValueError("one findings list per datalist entry is required")
    results = []
    for case, entry in zip(findings, entries, strict=True):
        best: dict[str, Any] = {}
        for f in case:
            name = vertebra_name(f.label)
            if name not in best or float(f.probability) > float(best[name].probability):
                best[name] = f
        pred = [(name, _xyz(f.centre_mm)) for name, f in best.items()]
        results.append(identification_rate(pred, truth_centroids(entry), max_distance_mm))
    errors = errors_by_label(results)
    summary = aggregate_id_rates(results)
    summary["per_case"] = [r.to_dict() for r in results]
    return summary, errors


def finite_json(obj: Any) -> Any:
    """JSON has no NaN: write it as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_report(report: dict[str, Any], out_dir: Path, froc: FrocResult | None = None,
                 errors: Mapping[str, Sequence[float]] | None = None, threshold_mm: float | None = None) -> dict:
    """metrics.json + figures into out_dir; returns the report with the figure paths added."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    if froc is not None and froc.n_nodules:
        figures.append(str(plot_froc(froc, out_dir / "froc.png", title=report.get("model", {}).get("name", "FROC"))))
    if errors and any(len(v) for v in errors.values()):
        figures.append(str(plot_errors(errors, out_dir / "localisation_errors.png", threshold_mm=threshold_mm)))
    report = {**report, "figures": figures}
    tmp = out_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(finite_json(report), indent=2) + "\n", encoding="utf-8")
    tmp.replace(out_dir / "metrics.json")
    return report
