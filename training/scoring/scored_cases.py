"""The lung pair's held-out and calibration cases scored as the gateway would serve them, in worker processes.

`score_case` runs one generated CT through the gateway's own first stage (`inference.preprocess`, `model_pass`)
and candidate scoring (`inference.second_stage.score_candidates`) and keeps every first-stage component (with
the source-grid voxels the gateway's postprocess thresholds, `training.scoring.served.source_voxels`) and every
scored blob; `scored_split` caches those rows as one JSON file per seed.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.backends.onnxruntime_backend import OnnxRuntimeBackend
from inference.model_card import ModelCard
from inference.model_repo import load_model
from inference.postprocess import sigmoid
from inference.second_stage import score_candidates
from training.scoring.cases import component_labels, infer_case, model_grid_hu, nodule_components
from training.scoring.served import source_voxels

# what each worker process serves (set once per process by `_init_worker`)
_STATE: dict[str, Any] = {}


def _init_worker(first_dir: str, classifier_onnx: str, classifier_card: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    first = load_model(Path(first_dir))
    _STATE["first"] = first
    _STATE["first_backend"] = OnnxRuntimeBackend(first.weights_path, first.name,
                                                 providers=["CPUExecutionProvider"], intra_op_threads=1)
    _STATE["card"] = ModelCard.model_validate(classifier_card)
    _STATE["backend"] = OnnxRuntimeBackend(Path(classifier_onnx), classifier_card["name"],
                                           providers=["CPUExecutionProvider"], intra_op_threads=1)


def first_stage_row(entry: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The first-stage part of `score_case`: FROC components (model grid, p > 0.05, those whose model-grid mean HU
    passes the first stage's min/max_mean_hu, as `training.scoring.cases.nodule_candidates`) with their
    `source_voxels`; and the case's volume."""
    first = _STATE["first"]
    t0 = time.perf_counter()
    volume, image, info, logits = infer_case(entry, first.card, _STATE["first_backend"])
    hu = model_grid_hu(image, first.card)
    prob = sigmoid(logits[0])
    labels = component_labels(prob)
    components = nodule_components(prob, volume, info, hu=hu, min_mean_hu=first.card.thresholds.min_mean_hu,
                                   max_mean_hu=first.card.thresholds.max_mean_hu, labels=labels)
    measured = source_voxels(prob, info, volume, labels, [k for _, _, k in components])
    empty = (np.zeros(0), np.zeros(0), np.zeros((0, 3)))
    row = {"seed": entry["seed"], "components": [(c, p) for c, p, _ in components],
           "source_voxel_mm3": float(volume.voxel_volume_mm3),
           "component_probs": [measured.get(k, empty)[0].tolist() for _, _, k in components],
           "component_hu": [np.round(measured.get(k, empty)[1], 1).tolist() for _, _, k in components],
           "component_mm": [np.round(measured.get(k, empty)[2], 3).tolist() for _, _, k in components],
           "first_stage_s": time.perf_counter() - t0}
    return row, volume


def score_case(entry: dict[str, Any]) -> dict[str, Any]:
    """`first_stage_row` plus every blob of the case scored by the classifier given to the worker."""
    row, volume = first_stage_row(entry)
    t0 = time.perf_counter()
    scored = score_candidates(volume, _STATE["backend"], _STATE["card"])
    row["blobs"] = [(tuple(float(v) for v in m), float(p))
                    for m, p in zip(volume.index_to_patient(scored.source_index), scored.probability, strict=True)]
    row.update(diameters=scored.diameter_mm.tolist(), source_index=scored.source_index.tolist(),
               second_stage_s=time.perf_counter() - t0)
    return row


def scored_split(entries: list[dict[str, Any]], cache: Path, first_dir: Path, onnx: Path, card: dict[str, Any],
                 workers: int, log: Any = print) -> list[dict[str, Any]]:
    """`score_case` for each entry, cached as one JSON per seed under `cache` (a cached row without source voxels,
    from before they were kept, is scored again)."""
    cache.mkdir(parents=True, exist_ok=True)
    rows = {e["seed"]: _cached(cache / f"{e['seed']}.json") for e in entries}
    todo = [e for e in entries if rows[e["seed"]] is None]
    if todo:
        t0 = time.time()
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                 initargs=(str(first_dir), str(onnx), card)) as pool:
            for k, r in enumerate(pool.map(score_case, todo), start=1):
                (cache / f"{r['seed']}.json").write_text(json.dumps(r))
                rows[r["seed"]] = r
                log(f"scored {cache.name}: {k}/{len(todo)} cases, {time.time() - t0:.0f} s")
    return [rows[e["seed"]] for e in entries]  # type: ignore[misc]


def _cached(path: Path) -> dict[str, Any] | None:
    """A cached row, unless missing or from before source voxels were kept."""
    if not path.is_file():
        return None
    row = json.loads(path.read_text(encoding="utf-8"))
    return row if "component_probs" in row else None


