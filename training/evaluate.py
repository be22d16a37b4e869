"""`dxgate evaluate MODEL DATASET`: run a registered model over a datalist as the gateway serves it, and score it.

The datalist (MONAI Decathlon JSON, see `training.loaders.datalist`) lists DICOM series: each entry's
"image" is a folder of .dcm files (or one file); or it is a generated one (`training.datasets`: NIfTI volumes
with their spacing and origin in the entry). The ground truth it carries and the scoring are
`training.scoring.findings`'s. Results go to `out_dir/metrics.json` plus PNG figures; the same dict is returned.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from inference.backends.factory import make_backend
from inference.composition import build_runner, stage_models
from inference.errors import InferenceError
from inference.model_repo import RegisteredModel, composing_models, discover_models, load_model
from training.datasets import entry_volume
from training.errors import LoaderError
from training.loaders.datalist import SPLITS, read_datalist, sha256_file
from training.metrics.vertebrae import VERSE_MAX_DISTANCE_MM
from training.scoring.findings import score_nodules, score_vertebrae, write_report

log = logging.getLogger(__name__)

_NOT_DICOM = {".json", ".txt", ".csv", ".png", ".jpg", ".md", ".nii", ".gz", ".mhd", ".raw"}


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


def stage_models_of(registered: RegisteredModel, models_dir: Path) -> dict[str, RegisteredModel]:
    """The models installed in `models_dir` that run the later stages of `registered`'s composition (those not
    installed are left out: the gateway then runs the model alone, `inference.composition.build_runner`)."""
    installed = discover_models(models_dir)
    return {name: installed[name] for name in stage_models(registered.card) if name in installed}


def _run_cases(registered: RegisteredModel, stages: dict[str, RegisteredModel], entries: list[dict[str, Any]],
               backend: str, backend_options: Mapping[str, Any]
               ) -> tuple[list[list[Any]], list[dict[str, str]], list[float]]:
    """Each entry through the model as its card composes it (with the installed `stages`): findings per case, the
    failed cases (scored as having no findings, so the figures are never flattered by skipping one) and seconds
    per case."""
    findings: list[list[Any]] = []
    failed: list[dict[str, str]] = []
    seconds: list[float] = []
    backends = {m.name: make_backend(m, backend, **dict(backend_options)) for m in [registered, *stages.values()]}
    try:
        runner = build_runner(registered, {registered.name: registered, **stages}, backends,
                              first_stage_only=not stages)
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
        for be in backends.values():
            be.close()
    return findings, failed, seconds


def evaluate_command(model: str | Path, dataset: Path, out_dir: Path | None = None, *, split: str | None = None,
                     models_dir: Path = Path("models"), backend: str = "onnxruntime",
                     backend_options: Mapping[str, Any] | None = None, first_stage_only: bool = False) -> dict:
    """Run `model` (a folder, or a name under models_dir) on every case of the dataset split and score it.

    As the gateway serves it: composed of the stages its card declares (their models installed in the same models
    folder), unless `first_stage_only`. A case whose inference fails is recorded under "failed" and scored as having
    no findings. Returns the metrics dict also written to metrics.json.
    """
    folder = Path(model) if Path(model).is_dir() else Path(models_dir) / str(model)
    registered = load_model(folder)
    card = registered.card
    if not card.runs_alone:
        owners = ", ".join(composing_models(card.name, discover_models(folder.parent))) or "the model composing it"
        raise LoaderError(f"{card.name} runs only as a stage of another model's composition: evaluate {owners}")
    stages = {} if first_stage_only else stage_models_of(registered, folder.parent)
    datalist = resolve_dataset(Path(dataset))
    split_name, entries = pick_split(datalist, split)
    if not entries:
        raise LoaderError(f"{datalist}: split {split_name!r} is empty")
    out_dir = Path(out_dir) if out_dir else Path("var") / "evaluate" / f"{card.name}-{card.version}"
    findings, failed, seconds = _run_cases(registered, stages, entries, backend, backend_options or {})
    second = next(iter(stages.values()), None)
    report: dict[str, Any] = {
        "model": {"name": card.name, "version": card.version, "weights_sha256": card.weights_sha256,
                  "task": card.task, "backend": backend,
                  "second_stage": None if second is None else {
                      "name": second.card.name, "version": second.card.version,
                      "weights_sha256": second.card.weights_sha256,
                      "probability": next((s.probability for s in card.stages if s.model == second.name), None)
                      or second.card.thresholds.probability}},
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
