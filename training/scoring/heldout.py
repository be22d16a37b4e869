"""The first stage's held-out figures and operating point, through the gateway's own preprocess / sliding window /
postprocess.

Nodules are connected components of the sigmoid map (centre, equivalent-sphere diameter, max probability) scored
with LUNA16 FROC rules (`training.metrics.froc`); vertebrae are the largest component of each argmax label, scored
with the VerSe identification rate (`training.metrics.vertebrae`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.model_card import ModelCard
from inference.postprocess import postprocess
from training.metrics.froc import froc_cpm, match_scan
from training.metrics.plots import plot_errors, plot_froc
from training.metrics.vertebrae import aggregate_id_rates, errors_by_label, identification_rate
from training.scoring.cases import TorchBackend, infer_case, model_grid_hu, nodule_candidates
from training.transforms import SPINE_LEVELS, SPINE_VERSE_VALUES

OPERATING_FLOOR = 0.5      # the card's threshold is chosen at or above this
DENSE_HU = -400.0          # vessel wall, pleura, chest wall: denser than any ground glass
ATTACHED_FRACTION = 0.05   # a nodule is "attached" when this much of its 1-4 mm outer shell is dense
NODULE_METHOD = ("inference.preprocess + sliding_window + postprocess (as served); LUNA16 FROC "
                 "(training.metrics.froc.froc_cpm); curve from model-grid components at p > 0.05 "
                 "(training.scoring.cases.nodule_candidates, thresholds.min/max_mean_hu applied), operating point "
                 "through the gateway's postprocess")
VERTEBRA_METHOD = ("inference.preprocess + sliding_window + postprocess (as served); VerSe id.rate, "
                   "20 mm (training.metrics.vertebrae)")

Truths = list[list[tuple[Any, float]]]


def truths_of(entries: list[dict[str, Any]]) -> Truths:
    """(centre mm, diameter mm) of each generated case's nodules."""
    return [[(n["centre_mm"], n["diameter_mm"]) for n in e["nodules"]] for e in entries]


def nodule_surroundings(entry: dict[str, Any], volume: Any, info: Any, hu: np.ndarray) -> list[float]:
    """Per nodule of `entry`: the fraction of the shell 1-4 mm outside its radius above DENSE_HU, on the
    model grid (`hu`, [Z, Y, X] in HU). Near 0 for a nodule alone in the lung; ~0.3 against the pleura."""
    hu = np.asarray(hu, dtype=np.float32).reshape(hu.shape[-3:])
    spacing = np.asarray(info.target_spacing, dtype=np.float64)
    to_model = np.asarray(info.source_spacing, dtype=np.float64) / spacing
    out = []
    for n in entry["nodules"]:
        centre = np.asarray(volume.patient_to_index(np.asarray(n["centre_mm"], dtype=np.float64))) * to_model
        r = float(n["diameter_mm"]) / 2
        lo = np.maximum(0, np.floor(centre - (r + 4.0) / spacing).astype(int))
        hi = np.minimum(hu.shape, np.ceil(centre + (r + 4.0) / spacing).astype(int) + 1)
        grid = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi, strict=True)), indexing="ij")
        dist = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing, strict=True)))
        shell = (dist > r + 1.0) & (dist < r + 4.0)
        box = hu[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        out.append(float((box[shell] > DENSE_HU).mean()) if shell.any() else 0.0)
    return out


def found_by_group(preds: list[list[tuple[tuple[float, float, float], float]]], entries: list[dict[str, Any]],
                   surroundings: list[list[float]] | None = None) -> dict[str, Any]:
    """Nodules found (LUNA16 hit rule) per kind, size band and juxtapleural flag, with the missed ones listed.

    With `surroundings` (`nodule_surroundings` per entry) also "attached" (dense tissue next to the nodule) or
    "isolated", and the missed ones carry their dense fraction.
    """
    groups: dict[str, list[int]] = {}
    missed = []
    for i, (case, entry) in enumerate(zip(preds, entries, strict=True)):
        truths = [(n["centre_mm"], n["diameter_mm"]) for n in entry["nodules"]]
        dense = surroundings[i] if surroundings is not None else [None] * len(truths)
        for n, p, f in zip(entry["nodules"], match_scan(case, truths).nodule_probs, dense, strict=True):
            d = float(n["diameter_mm"])
            size = "3-6 mm" if d < 6 else ("6-10 mm" if d < 10 else "10-30 mm")
            keys = [n.get("kind") or "unknown", size, *(["juxtapleural"] if n.get("juxtapleural") else [])]
            if f is not None:
                keys.append("attached" if f >= ATTACHED_FRACTION else "isolated")
            for key in keys:
                groups.setdefault(key, [0, 0])
                groups[key][0] += p is not None
                groups[key][1] += 1
            if p is None:
                missed.append({"seed": entry.get("seed"), "diameter_mm": round(d, 1), "kind": n.get("kind"),
                               "juxtapleural": bool(n.get("juxtapleural")),
                               **({"dense_fraction": round(f, 2)} if f is not None else {})})
    return {"found": {k: f"{v[0]}/{v[1]}" for k, v in sorted(groups.items())}, "missed": missed}


def choose_operating_point(card_fields: dict[str, Any], entries: list[dict[str, Any]], backend: Any,
                           fp_per_scan: float, floor: float = OPERATING_FLOOR) -> dict[str, Any]:
    """The lowest probability threshold (>= `floor`) at which the calibration scans have at most
    `fp_per_scan` false positives per scan (LUNA16 matching), with the sensitivity there.

    Findings come from the gateway's own postprocess at `floor` (components on the source grid, whose
    peak probabilities are lower than the model grid's after interpolation), so the threshold means the
    same thing where it is applied. Never chosen on held-out data.
    """
    fields = {**card_fields, "thresholds": {**card_fields["thresholds"], "probability": floor}}
    card = ModelCard.model_validate({**fields, "version": "calibration", "weights_sha256": "0" * 64})
    preds = []
    for entry in entries:
        volume, _, info, logits = infer_case(entry, card, backend)
        found, _ = postprocess(logits, volume, card, info)
        preds.append([(f.centre_mm, f.probability) for f in found])
    return {**threshold_at(froc_cpm(preds, truths_of(entries)), fp_per_scan, floor),
            "calibration_scans": len(entries)}


def threshold_at(froc: Any, fp_per_scan: float, floor: float) -> dict[str, Any]:
    """The lowest threshold (>= floor) of a calibration FROC with at most `fp_per_scan` FP per scan: halfway
    between the last finding kept and the first one dropped (the gateway keeps p > cut), with the figures there."""
    within = np.flatnonzero(froc.fps <= fp_per_scan)
    k = int(within[-1]) if within.size else 0
    kept = float(froc.thresholds[k]) if k else 1.0
    dropped = float(froc.thresholds[k + 1]) if k + 1 < len(froc.thresholds) else floor
    threshold = float(np.clip(0.5 * (kept + dropped), floor, 1.0 - 1e-6))
    return {"probability": threshold, "target_fp_per_scan": fp_per_scan,
            "calibration_fp_per_scan": float(froc.fps[k]), "calibration_sensitivity": float(froc.sensitivity[k]),
            "calibration_nodules": froc.n_nodules}


def _nodule_figures(card: ModelCard, entries: list[dict[str, Any]], backend: Any,
                    figures_dir: Path | None) -> dict[str, Any]:
    curve_preds, op_preds, dense = [], [], []
    for entry in entries:
        volume, image, info, logits = infer_case(entry, card, backend)
        hu = model_grid_hu(image, card)
        curve_preds.append(nodule_candidates(logits, volume, info, hu, card))
        found, _ = postprocess(logits, volume, card, info)
        op_preds.append([(f.centre_mm, f.probability) for f in found])
        dense.append(nodule_surroundings(entry, volume, info, hu))
    truths = truths_of(entries)
    froc, at = froc_cpm(curve_preds, truths), froc_cpm(op_preds, truths)
    figures = []
    if figures_dir is not None and froc.n_nodules:
        figures.append(plot_froc(froc, figures_dir / "froc.png", title=f"{card.name}: held-out FROC").name)
    return {"figures": figures, "n_nodules": froc.n_nodules,
            "sensitivity_at_1fp_per_scan": froc.sensitivity_at(1.0), "cpm": froc.cpm,
            "sensitivity_at_fp": dict(zip([f"{f:g}" for f in froc.operating_points], froc.sensitivities,
                                          strict=True)),
            "operating_point": {"probability": card.thresholds.probability,
                                "sensitivity": at.n_true_positives / max(at.n_nodules, 1),
                                "fp_per_scan": at.n_false_positives / max(len(entries), 1),
                                **found_by_group(op_preds, entries, dense)},
            "method": NODULE_METHOD}


def _vertebra_figures(card: ModelCard, entries: list[dict[str, Any]], backend: Any,
                      figures_dir: Path | None) -> dict[str, Any]:
    verse = dict(zip(range(1, 26), SPINE_VERSE_VALUES, strict=True))
    results = []
    for entry in entries:
        volume, _, info, logits = infer_case(entry, card, backend)
        found, _ = postprocess(logits, volume, card, info)
        results.append(identification_rate([(verse[f.label_index], f.centre_mm) for f in found],
                                           [(v["index"], v["centroid_mm"]) for v in entry["vertebrae"]]))
    summary = aggregate_id_rates(results)
    summary.pop("per_label", None)
    # plotted per level name, cranial to caudal (the ids are VerSe label values)
    name = dict(zip((str(v) for v in SPINE_VERSE_VALUES), SPINE_LEVELS, strict=True))
    by_id = errors_by_label(results)
    errors = {name.get(k, k): by_id[k] for k in sorted(by_id, key=lambda k: int(k) if k.isdigit() else 99)}
    figures = []
    if figures_dir is not None and errors:
        figures.append(plot_errors(errors, figures_dir / "localisation_errors.png",
                                   title=f"{card.name}: held-out localisation error", threshold_mm=20.0).name)
    return {**summary, "figures": figures, "method": VERTEBRA_METHOD}


def score_heldout(net: torch.nn.Module, card_fields: dict[str, Any], entries: list[dict[str, Any]],
                  test_seed: int, figures_dir: Path | None = None, backend: Any = None) -> dict[str, Any]:
    """Held-out figures through the gateway's own preprocess / sliding window / postprocess.

    `backend` (the gateway's Backend protocol, e.g. ONNX Runtime over the exported model) runs the
    network; None runs `net` in PyTorch. With `figures_dir`, the FROC curve (nodules) or the localisation
    errors per level (vertebrae) are saved there as PNG and listed under "figures".
    """
    card = ModelCard.model_validate({**card_fields, "version": "eval", "weights_sha256": "0" * 64})
    backend = TorchBackend(net) if backend is None else backend
    common = {"heldout_cases": len(entries), "heldout_seeds": [test_seed, test_seed + len(entries) - 1],
              "heldout_rows": int(np.asarray(entries[0]["shape"])[1]) if entries else None}
    scorer = _nodule_figures if card.postprocess == "nodules" else _vertebra_figures
    return {**common, **scorer(card, entries, backend, figures_dir)}
