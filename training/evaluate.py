"""`dxgate evaluate MODEL DATASET`: run a registered model over a datalist and score it like the benchmarks.

The datalist (MONAI Decathlon JSON, see `training.loaders.datalist`) lists DICOM series: each entry's
"image" is a folder of .dcm files (or one file); or it is a generated one (`training.datasets`: NIfTI volumes
with their spacing and origin in the entry). Ground truth per entry, in patient LPS mm:

- nodule models: "nodules": [[x, y, z, diameter_mm], ...] (or [{"centre_mm": [..], "diameter_mm": d}]),
  optional "excluded" (irrelevant findings, same form) -> LUNA16 FROC / CPM (`training.metrics.froc`);
- vertebra models: "centroids": [[label, x, y, z], ...] with VerSe labels or names (or
  "vertebrae": [{"label"/"index": .., "centroid_mm": [..]}]) -> VerSe id.rate and localisation error.

Results go to `out_dir/metrics.json` plus PNG figures; the same dict is returned.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from training.datasets import entry_volume
from training.errors import LoaderError
from training.loaders.datalist import SPLITS, read_datalist, sha256_file
from training.loaders.verse import VERTEBRA_NAMES
from training.metrics.froc import FrocResult, froc_cpm
from training.metrics.vertebrae import (
    VERSE_MAX_DISTANCE_MM,
    aggregate_id_rates,
    errors_by_label,
    identification_rate,
)

log = logging.getLogger(__name__)

_NOT_DICOM = {".json", ".txt", ".csv", ".png", ".jpg", ".md", ".nii", ".gz", ".mhd", ".raw"}


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


def series_files(image: str | Path) -> list[Path]:
    """DICOM files of one entry: the file itself, or every (non-sidecar) file under the folder."""
    p = Path(image)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise LoaderError(f"{p}: image folder does not exist")
    dcm = sorted(f for f in p.rglob("*.dcm") if f.is_file())
    files = dcm or sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() not in _NOT_DICOM)
    if not files:
        raise LoaderError(f"{p}: no DICOM files")
    return files


def is_generated(entry: Mapping[str, Any]) -> bool:
    """A case of `dxgate`'s own generator: a NIfTI volume plus its spacing and origin in the entry."""
    image = str(entry.get("image", ""))
    return image.endswith((".nii", ".nii.gz")) and "spacing" in entry and "origin" in entry


def resolve_dataset(dataset: Path) -> Path:
    """A datalist JSON file, or the single / `datalist.json` one inside a folder."""
    dataset = Path(dataset)
    if dataset.is_file():
        return dataset
    if dataset.is_dir():
        if (dataset / "datalist.json").is_file():
            return dataset / "datalist.json"
        found = sorted(dataset.glob("*.json"))
        if len(found) == 1:
            return found[0]
    raise LoaderError(f"{dataset}: give a datalist JSON file (or a folder holding exactly one)")


def pick_split(datalist: Path, split: str | None) -> tuple[str, list[dict[str, Any]]]:
    """The requested split, or the first non-empty of test, validation, training."""
    if split is not None:
        return split, read_datalist(datalist, split)
    doc = json.loads(datalist.read_text(encoding="utf-8"))
    for name in ("test", "validation", "training"):
        if doc.get(name):
            return name, read_datalist(datalist, name)
    raise LoaderError(f"{datalist}: no non-empty split among {SPLITS}")


def _finite(obj: Any) -> Any:
    """JSON has no NaN: write it as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_report(report: dict[str, Any], out_dir: Path, froc: FrocResult | None = None,
                 errors: Mapping[str, Sequence[float]] | None = None, threshold_mm: float | None = None) -> dict:
    """metrics.json + figures into out_dir; returns the report with the figure paths added."""
    from training.metrics.plots import plot_errors, plot_froc

    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    if froc is not None and froc.n_nodules:
        figures.append(str(plot_froc(froc, out_dir / "froc.png", title=report.get("model", {}).get("name", "FROC"))))
    if errors and any(len(v) for v in errors.values()):
        figures.append(str(plot_errors(errors, out_dir / "localisation_errors.png", threshold_mm=threshold_mm)))
    report = {**report, "figures": figures}
    tmp = out_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(_finite(report), indent=2) + "\n", encoding="utf-8")
    tmp.replace(out_dir / "metrics.json")
    return report


def second_stage_of(name: str, models_dir: Path) -> Any:
    """The model folder under `models_dir` whose card names `name` as its first stage (what the gateway attaches
    to that model, `dicom_gateway.server.attach_second_stages`), or None."""
    from inference.model_repo import discover_models

    found = [m for m in discover_models(models_dir).values()
             if m.card.first_stage is not None and m.card.first_stage.model == name]
    return found[0] if found else None


def evaluate_command(model: str | Path, dataset: Path, out_dir: Path | None = None, *, split: str | None = None,
                     models_dir: Path = Path("models"), backend: str = "onnxruntime",
                     backend_options: Mapping[str, Any] | None = None, first_stage_only: bool = False) -> dict:
    """Run `model` (a folder, or a name under models_dir) on every case of the dataset split and score it.

    As the gateway serves it: with the second stage installed beside it (a card in the same models folder naming
    it as `first_stage`), unless `first_stage_only`. A case whose inference fails is recorded under "failed" and
    scored as having no findings (so the figures are never flattered by skipping it). Returns the metrics dict
    also written to metrics.json.
    """
    from inference.backends.factory import make_backend
    from inference.errors import InferenceError
    from inference.model_repo import load_model
    from inference.pipeline import ModelRunner
    from inference.second_stage import SecondStage

    folder = Path(model) if Path(model).is_dir() else Path(models_dir) / str(model)
    registered = load_model(folder)
    card = registered.card
    if card.first_stage is not None:
        raise LoaderError(f"{card.name} is the second stage of {card.first_stage.model}: evaluate "
                          f"{card.first_stage.model}, which runs it")
    second = None if first_stage_only else second_stage_of(card.name, folder.parent)
    datalist = resolve_dataset(Path(dataset))
    split_name, entries = pick_split(datalist, split)
    if not entries:
        raise LoaderError(f"{datalist}: split {split_name!r} is empty")
    out_dir = Path(out_dir) if out_dir else Path("var") / "evaluate" / f"{card.name}-{card.version}"
    findings: list[list[Any]] = []
    failed: list[dict[str, str]] = []
    seconds: list[float] = []
    be = make_backend(registered, backend, **dict(backend_options or {}))
    second_be = make_backend(second, backend, **dict(backend_options or {})) if second is not None else None
    try:
        runner = ModelRunner(registered, be, second_stage=None if second is None else
                             SecondStage(card=second.card, backend=second_be))
        for i, entry in enumerate(entries):
            case_id = str(entry.get("seriesuid") or entry.get("subject") or entry.get("id") or i)
            start = time.perf_counter()
            try:
                result = (runner.run_volume(entry_volume(entry)) if is_generated(entry)
                          else runner.run(series_files(entry["image"])))
                findings.append(list(result.findings))
            except (InferenceError, LoaderError) as exc:
                log.warning("evaluate: case %s failed at %s: %s", case_id, getattr(exc, "stage", "load"), exc)
                failed.append({"case": case_id, "error": f"{type(exc).__name__}: {exc}"})
                findings.append([])
            seconds.append(time.perf_counter() - start)
    finally:
        be.close()
        if second_be is not None:
            second_be.close()
    report: dict[str, Any] = {
        "model": {"name": card.name, "version": card.version, "weights_sha256": card.weights_sha256,
                  "task": card.task, "backend": backend,
                  "second_stage": None if second is None else {
                      "name": second.card.name, "version": second.card.version,
                      "weights_sha256": second.card.weights_sha256,
                      "probability": second.card.thresholds.probability}},
        "dataset": {"datalist": str(datalist), "sha256": sha256_file(datalist), "split": split_name,
                    "n_cases": len(entries)},
        "failed": failed,
        "seconds_per_case": {"mean": sum(seconds) / len(seconds), "max": max(seconds)},
        "command": f"dxgate evaluate {model} {dataset}" + (" --first-stage-only" if first_stage_only else ""),
    }
    if card.postprocess == "nodules":
        metrics, froc = score_nodules(findings, entries)
        report["metrics"] = {"benchmark": "LUNA16 FROC/CPM", **metrics}
        return write_report(report, out_dir, froc=froc)
    metrics, errors = score_vertebrae(findings, entries)
    report["metrics"] = {"benchmark": "VerSe id.rate", **metrics}
    return write_report(report, out_dir, errors=errors, threshold_mm=VERSE_MAX_DISTANCE_MM)
