"""`dxgate train <task> --config <yaml>`: generate data, train, evaluate held-out, export, register.

The held-out evaluation post-processes like the gateway (CONTRACTS.md "Model contract"): nodules are
connected components of the sigmoid map (centre, equivalent-sphere diameter, max probability) scored
with LUNA16 FROC rules (`training.metrics.froc`); vertebrae are the largest component of each argmax
label, scored with the VerSe identification rate (`training.metrics.vertebrae`). Evaluation runs the
gateway's own `inference.preprocess`, `inference.sliding_window` and `inference.postprocess`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from training.export import export_onnx
from training.register import card_fields_for, register_model
from training.train import TrainConfig, data_split, load_config, make_loss, train, training_precision
from training.transforms import SPINE_LEVELS, SPINE_VERSE_VALUES

TASK_ALIASES = {"lung-nodule": "lung-nodule", "lung_nodule_ct": "lung-nodule", "lung-nodule-detection": "lung-nodule",
                "spine-vertebrae": "spine-vertebrae", "spine_vertebrae_ct": "spine-vertebrae",
                "vertebra-labelling": "spine-vertebrae"}


class _TorchBackend:
    """The gateway's Backend protocol over the in-memory network (ONNX parity is checked separately)."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net.eval()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {"logits": self.net(torch.from_numpy(np.ascontiguousarray(inputs["image"]))).numpy()}

    def close(self) -> None:
        return None


CANDIDATE_FLOOR = 0.05  # FROC candidates: components of the probability map above this
OPERATING_FLOOR = 0.5   # the card's threshold is chosen at or above this


def nodule_candidates(logits: np.ndarray, volume: Any, info: Any, floor: float = CANDIDATE_FLOOR,
                      limit: int = 500, hu: np.ndarray | None = None, min_mean_hu: float | None = None,
                      max_mean_hu: float | None = None) -> list[tuple[tuple[float, float, float], float]]:
    """FROC candidates from the model-grid map: components at p > floor, (centre mm, max probability).

    Measured on the model grid (mapping a 0.05-thresholded map back to a 512-row source grid costs
    minutes); the operating point itself is scored through the gateway's postprocess. With `hu` (the
    model-grid image in HU) components averaging below `min_mean_hu` or above `max_mean_hu` are dropped,
    as the gateway's postprocess does. Keeps the `limit` most probable components.
    """
    from inference.postprocess import sigmoid

    found = nodule_components(sigmoid(logits[0]), volume, info, floor, limit, hu, min_mean_hu, max_mean_hu)
    return [(c, p) for c, p, _ in found]


def component_labels(prob: np.ndarray, floor: float = CANDIDATE_FLOOR) -> np.ndarray:
    """Connected components (26-neighbourhood) of the model-grid probability map above `floor`."""
    from scipy import ndimage

    return ndimage.label(prob > floor, structure=np.ones((3, 3, 3), dtype=bool))[0]


def nodule_components(prob: np.ndarray, volume: Any, info: Any, floor: float = CANDIDATE_FLOOR,
                      limit: int = 500, hu: np.ndarray | None = None, min_mean_hu: float | None = None,
                      max_mean_hu: float | None = None, labels: np.ndarray | None = None
                      ) -> list[tuple[tuple[float, float, float], float, int]]:
    """`nodule_candidates` of the sigmoid map `prob`, plus each component's id in `labels` (`component_labels` of
    the map at `floor`, computed here when not given)."""
    from scipy import ndimage

    components = component_labels(prob, floor) if labels is None else labels
    n = int(components.max(initial=0))
    if n == 0:
        return []
    ids = np.arange(1, n + 1)
    maxima = np.asarray(ndimage.maximum(prob, components, ids))
    if hu is not None and (min_mean_hu is not None or max_mean_hu is not None):
        mean_hu = np.asarray(ndimage.mean(hu, components, ids))
        low = -np.inf if min_mean_hu is None else min_mean_hu
        high = np.inf if max_mean_hu is None else max_mean_hu
        maxima[(mean_hu < low) | (mean_hu > high)] = -1.0
        ids = ids[maxima >= 0]
        if ids.size == 0:
            return []
    keep = ids[np.argsort(-maxima[ids - 1])[:limit]]
    centres = np.asarray(ndimage.center_of_mass(prob, components, keep), dtype=float).reshape(-1, 3)
    source_index = centres * (np.asarray(info.target_spacing) / np.asarray(info.source_spacing))
    return [(tuple(float(v) for v in volume.index_to_patient(c)), float(maxima[k - 1]), int(k))  # type: ignore[misc]
            for c, k in zip(source_index, keep, strict=True)]


def _infer_case(entry: dict[str, Any], card: Any, backend: Any) -> tuple[Any, np.ndarray, Any, np.ndarray]:
    """One case through the gateway's preprocess and sliding window: (volume, image, info, logits)."""
    from inference.model_pass import model_logits
    from inference.preprocess import preprocess
    from training.datasets import entry_volume

    volume = entry_volume(entry)
    image, info = preprocess(volume, card)
    logits = model_logits(image, backend, card)
    return volume, image, info, logits


def _model_grid_hu(image: np.ndarray, card: Any) -> np.ndarray:
    """The preprocessed image (windowed to [0, 1]) back in HU, clipped to the card's window."""
    low, high = card.input.window
    return low + np.asarray(image, dtype=np.float32) * (high - low)


def _curve_candidates(logits: np.ndarray, volume: Any, info: Any, hu: np.ndarray, card: Any
                      ) -> list[tuple[tuple[float, float, float], float]]:
    return nodule_candidates(logits, volume, info, hu=hu, min_mean_hu=card.thresholds.min_mean_hu,
                             max_mean_hu=card.thresholds.max_mean_hu)


DENSE_HU = -400.0           # vessel wall, pleura, chest wall: denser than any ground glass
ATTACHED_FRACTION = 0.05   # a nodule is "attached" when this much of its 1-4 mm outer shell is dense


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
    from training.metrics.froc import match_scan

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
    from inference.model_card import ModelCard
    from inference.postprocess import postprocess
    from training.metrics.froc import froc_cpm

    fields = {**card_fields, "thresholds": {**card_fields["thresholds"], "probability": floor}}
    card = ModelCard.model_validate({**fields, "version": "calibration", "weights_sha256": "0" * 64})
    preds, truths = [], []
    for entry in entries:
        volume, _, info, logits = _infer_case(entry, card, backend)
        found, _ = postprocess(logits, volume, card, info)
        preds.append([(f.centre_mm, f.probability) for f in found])
        truths.append([(n["centre_mm"], n["diameter_mm"]) for n in entry["nodules"]])
    return {**threshold_at(froc_cpm(preds, truths), fp_per_scan, floor), "calibration_scans": len(entries)}


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


def evaluate(net: torch.nn.Module, card_fields: dict[str, Any], entries: list[dict[str, Any]],
             test_seed: int, figures_dir: Path | None = None, backend: Any = None) -> dict[str, Any]:
    """Held-out figures through the gateway's own preprocess / sliding window / postprocess.

    `backend` (the gateway's Backend protocol, e.g. ONNX Runtime over the exported model) runs the
    network; None runs `net` in PyTorch. With `figures_dir`, the FROC curve (nodules) or the localisation
    errors per level (vertebrae) are saved there as PNG and listed under "figures".
    """
    from inference.model_card import ModelCard
    from inference.postprocess import postprocess
    from training.metrics.froc import froc_cpm
    from training.metrics.plots import plot_errors, plot_froc
    from training.metrics.vertebrae import aggregate_id_rates, errors_by_label, identification_rate

    card = ModelCard.model_validate({**card_fields, "version": "eval", "weights_sha256": "0" * 64})
    backend = _TorchBackend(net) if backend is None else backend
    curve_preds, op_preds, truths, results, dense = [], [], [], [], []
    for entry in entries:
        volume, image, info, logits = _infer_case(entry, card, backend)
        if card.postprocess == "nodules":
            truths.append([(n["centre_mm"], n["diameter_mm"]) for n in entry["nodules"]])
            hu = _model_grid_hu(image, card)
            curve_preds.append(_curve_candidates(logits, volume, info, hu, card))
            found, _ = postprocess(logits, volume, card, info)
            op_preds.append([(f.centre_mm, f.probability) for f in found])
            dense.append(nodule_surroundings(entry, volume, info, hu))
        else:
            found, _ = postprocess(logits, volume, card, info)
            verse = dict(zip(range(1, 26), SPINE_VERSE_VALUES, strict=True))
            results.append(identification_rate([(verse[f.label_index], f.centre_mm) for f in found],
                                               [(v["index"], v["centroid_mm"]) for v in entry["vertebrae"]]))
    common = {"heldout_cases": len(entries), "heldout_seeds": [test_seed, test_seed + len(entries) - 1],
              "heldout_rows": int(np.asarray(entries[0]["shape"])[1]) if entries else None}
    figures: list[str] = []
    if card.postprocess == "nodules":
        froc, at = froc_cpm(curve_preds, truths), froc_cpm(op_preds, truths)
        if figures_dir is not None and froc.n_nodules:
            figures.append(plot_froc(froc, figures_dir / "froc.png", title=f"{card.name}: held-out FROC").name)
        return {**common, "figures": figures, "n_nodules": froc.n_nodules,
                "sensitivity_at_1fp_per_scan": froc.sensitivity_at(1.0), "cpm": froc.cpm,
                "sensitivity_at_fp": dict(zip([f"{f:g}" for f in froc.operating_points], froc.sensitivities,
                                              strict=True)),
                "operating_point": {"probability": card.thresholds.probability,
                                    "sensitivity": at.n_true_positives / max(at.n_nodules, 1),
                                    "fp_per_scan": at.n_false_positives / max(len(entries), 1),
                                    **found_by_group(op_preds, entries, dense)},
                "method": "inference.preprocess + sliding_window + postprocess (as served); LUNA16 FROC "
                          "(training.metrics.froc.froc_cpm); curve from model-grid components at p > 0.05 "
                          "(training.cli.nodule_candidates, thresholds.min/max_mean_hu applied), operating point "
                          "through the gateway's postprocess"}
    summary = aggregate_id_rates(results)
    summary.pop("per_label", None)
    # plotted per level name, cranial to caudal (the ids are VerSe label values)
    name = dict(zip((str(v) for v in SPINE_VERSE_VALUES), SPINE_LEVELS, strict=True))
    by_id = errors_by_label(results)
    errors = {name.get(k, k): by_id[k] for k in sorted(by_id, key=lambda k: int(k) if k.isdigit() else 99)}
    if figures_dir is not None and errors:
        figures.append(plot_errors(errors, figures_dir / "localisation_errors.png",
                                   title=f"{card.name}: held-out localisation error", threshold_mm=20.0).name)
    return {**common, **summary, "figures": figures,
            "method": "inference.preprocess + sliding_window + postprocess (as served); VerSe id.rate, "
                      "20 mm (training.metrics.vertebrae)"}


def onnx_cpu_seconds(onnx_path: Path, shape: Sequence[int], roi: Sequence[int], overlap: float,
                     threads: int = 2, flips: Sequence[Sequence[int]] = ()) -> float:
    """Wall seconds of the sliding-window ONNX Runtime passes over a zero volume of `shape` (z, y, x):
    the plain one and one per entry of `flips` (mirroring a zero volume changes nothing, so it is skipped)."""
    import onnxruntime as ort
    from monai.inferers import sliding_window_inference

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])

    volume = torch.zeros((1, 1, *shape), dtype=torch.float32)
    start = time.perf_counter()
    for _ in range(1 + len(flips)):
        sliding_window_inference(volume, tuple(roi), 1, run, overlap=overlap, mode="gaussian")
    return time.perf_counter() - start


def _cpu_benchmark(net: torch.nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """Time the exported model on the chest CT the brief names (300 x 512 x 512, 1.25 x 0.7 x 0.7 mm)."""
    source = (300, 512, 512), (1.25, 0.7, 0.7)
    shape = [int(round(n * s / t)) for n, s, t in zip(*source, cfg.spacing_mm, strict=True)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(net, torch.zeros((1, 1, *cfg.roi_size)), path)
        seconds = onnx_cpu_seconds(path, shape, cfg.roi_size, cfg.overlap, flips=cfg.flips)
    return {"onnxruntime_cpu_seconds": round(seconds, 2), "threads": 2, "resampled_shape": shape,
            "passes": 1 + len(cfg.flips),
            "source": "300 x 512 x 512 at 1.25 x 0.7 x 0.7 mm, sliding window (every test-time flip included), "
                      "excluding preprocessing"}


def _evaluate_exported(net: torch.nn.Module, fields: dict[str, Any], test: list[dict[str, Any]], cfg: TrainConfig,
                       figures_dir: Path) -> dict[str, Any]:
    """Held-out evaluation through ONNX Runtime on the exported network, the way the gateway serves it
    (and about 3x faster than PyTorch eager on CPU); registration re-exports and checks parity.

    With `operating_fp_per_scan` (nodules), the card's probability threshold is first chosen on the
    calibration split (`choose_operating_point`) and written into `fields`.
    """
    from inference.backends.onnxruntime_backend import OnnxRuntimeBackend

    calibrate = cfg.task == "lung-nodule" and cfg.operating_fp_per_scan is not None and cfg.data.n_calibration > 0
    if not test and not calibrate:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(net, torch.zeros((1, 1, *cfg.roi_size)), path)
        backend = OnnxRuntimeBackend(path, cfg.name, providers=["CPUExecutionProvider"],
                                     intra_op_threads=cfg.threads or 0)
        try:
            chosen = None
            if calibrate:
                chosen = choose_operating_point(fields, data_split(cfg, "calibration"), backend,
                                                cfg.operating_fp_per_scan)
                fields["thresholds"] = {**fields["thresholds"], "probability": chosen["probability"]}
            metrics = evaluate(net, fields, test, cfg.data.test_seed, figures_dir, backend=backend) if test else {}
            if chosen is not None:
                metrics["operating_point_selection"] = {
                    **chosen, "calibration_seeds": [cfg.data.calibration_seed,
                                                    cfg.data.calibration_seed + cfg.data.n_calibration - 1]}
            return metrics
        finally:
            backend.close()


def _loss_description(cfg: TrainConfig) -> str:
    """The model card's words for the training loss."""
    parts = []
    if cfg.hard_voxel_fraction:
        parts.append(f"BCE over the hardest {cfg.hard_voxel_fraction:.0%} of voxels")
        if cfg.nodule_weight:
            parts.append(f"+ {cfg.nodule_weight:g} x BCE averaged per nodule")
    name = type(make_loss(cfg)).__name__
    return f"{name} ({', '.join(parts)})" if parts else name


def first_stage_fields(cfg: TrainConfig, result: Any, command: str) -> dict[str, Any]:
    """Model-card fields of a network trained by `command` (everything but metrics, version and weights_sha256)."""
    fields = card_fields_for(cfg.task, name=cfg.name)
    fields.update(
        input={"name": "image", "spacing_mm": cfg.spacing_mm, "window": cfg.window, "roi_size": cfg.roi_size,
               "overlap": cfg.overlap, "batch_size": 1, "flips": [list(a) for a in cfg.flips]},
        thresholds={**fields["thresholds"], "probability": cfg.probability},
        training={
            "data": "synthetic", "generator": "training.synthetic",
            "train_seeds": [cfg.data.seed, cfg.data.seed + cfg.data.n_train - 1],
            "validation_seeds": [cfg.data.val_seed, cfg.data.val_seed + cfg.data.n_val - 1],
            "rows": cfg.data.rows,
            "nodules_per_training_scan": "0-4 (seeded)" if cfg.data.train_nodules is None else cfg.data.train_nodules,
            "seed": cfg.seed, "steps": result.step, "network": {
                "type": "monai.networks.nets.UNet", "channels": list(cfg.channels),
                "num_res_units": cfg.num_res_units},
            "command": command, "seconds": round(result.seconds),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "precision": training_precision(cfg),
            "loss": _loss_description(cfg),
            "checkpoint": "best validation Dice" if cfg.checkpoint == "best" else "last step",
            **({"initialised_from": str(cfg.init_from)} if cfg.init_from is not None else {}),
        },
    )
    return fields


def train_command(task: str, config: Path, second_stage: Path | None = None) -> int:
    """Run one training task end to end; returns a process exit status (0 = model registered).

    With `second_stage` (a `dxgate train lung-nodule-candidates` config), the lung command goes on to train,
    calibrate, evaluate and register the second stage with the first (`training.lung_model`): the whole lung model
    in one command."""
    command = f"dxgate train {task} --config {config}"
    try:
        cfg = load_config(config)
    except (OSError, ValidationError, ValueError) as exc:
        print(f"dxgate train: cannot read {config}: {exc}", file=sys.stderr)
        return 2
    if TASK_ALIASES.get(task) != cfg.task:
        print(f"dxgate train: task {task!r} does not match the config's task {cfg.task!r}", file=sys.stderr)
        return 2
    second = None     # (its config file, the config)
    if second_stage is not None:
        from training.second_stage import load_config as load_second_stage_config

        if cfg.task != "lung-nodule":
            print(f"dxgate train: --second-stage: only the lung-nodule task has one, not {cfg.task}", file=sys.stderr)
            return 2
        try:
            second = second_stage, load_second_stage_config(second_stage)
        except (OSError, ValueError) as exc:
            print(f"dxgate train: cannot read {second_stage}: {exc}", file=sys.stderr)
            return 2
        command += f" --second-stage {second_stage}"
    result = train(cfg)
    if second is not None:
        from training.lung_model import train_second_stage_and_register

        out = train_second_stage_and_register(cfg, second[1], second[0], result, command,
                                              log=lambda s: print(s, flush=True), progress=sys.stderr.isatty())
        print(json.dumps(out, indent=1))
        return 0
    fields = first_stage_fields(cfg, result, command)
    test = data_split(cfg, "test") if cfg.data.n_test else []
    figures_dir = Path(tempfile.mkdtemp(prefix="dxgate-figures-"))
    metrics = _evaluate_exported(result.net, fields, test, cfg, figures_dir)
    if cfg.benchmark:
        metrics["timing"] = _cpu_benchmark(result.net, cfg)
    metrics["validation_dice"] = result.best_metric
    fields["metrics"] = metrics
    if cfg.register_to is None:
        print(json.dumps(metrics, indent=1))
        return 0
    figures = {name: figures_dir / name for name in metrics.get("figures", [])}
    folder = register_model(result.net, fields, cfg.register_to, extra_files=figures)
    print(f"registered {folder}\n{json.dumps(metrics, indent=1)}")
    return 0
