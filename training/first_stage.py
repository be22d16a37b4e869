"""The first stage of a model (the lung nodule or spine segmentation network) after training: its card fields,
its held-out figures and operating point through ONNX Runtime as the gateway serves it, its CPU timing, and its
registration."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from monai.inferers import sliding_window_inference

from inference.backends.onnxruntime_backend import OnnxRuntimeBackend
from training.config import TrainConfig
from training.device import training_device
from training.export import export_onnx
from training.losses import loss_description
from training.register import card_fields_for, register_model
from training.scoring.heldout import choose_operating_point, score_heldout
from training.train import TrainResult, data_split, training_precision


def onnx_cpu_seconds(onnx_path: Path, shape: Sequence[int], roi: Sequence[int], overlap: float,
                     threads: int = 2, flips: Sequence[Sequence[int]] = ()) -> float:
    """Wall seconds of the sliding-window ONNX Runtime passes over a zero volume of `shape` (z, y, x):
    the plain one and one per entry of `flips` (mirroring a zero volume changes nothing, so it is skipped)."""
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


def cpu_benchmark(net: torch.nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """Time the exported model on a typical chest CT grid (300 x 512 x 512, 1.25 x 0.7 x 0.7 mm)."""
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


def score_exported(net: torch.nn.Module, fields: dict[str, Any], test: list[dict[str, Any]], cfg: TrainConfig,
                   figures_dir: Path) -> dict[str, Any]:
    """Held-out figures through ONNX Runtime on the exported network, the way the gateway serves it
    (and about 3x faster than PyTorch eager on CPU); registration re-exports and checks parity.

    With `operating_fp_per_scan` (nodules), the card's probability threshold is first chosen on the
    calibration split (`choose_operating_point`) and written into `fields`.
    """
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
                assert cfg.operating_fp_per_scan is not None
                chosen = choose_operating_point(fields, data_split(cfg, "calibration"), backend,
                                                cfg.operating_fp_per_scan)
                fields["thresholds"] = {**fields["thresholds"], "probability": chosen["probability"]}
            metrics = score_heldout(net, fields, test, cfg.data.test_seed, figures_dir, backend=backend) if test else {}
            if chosen is not None:
                metrics["operating_point_selection"] = {
                    **chosen, "calibration_seeds": [cfg.data.calibration_seed,
                                                    cfg.data.calibration_seed + cfg.data.n_calibration - 1]}
            return metrics
        finally:
            backend.close()


def first_stage_fields(cfg: TrainConfig, result: TrainResult, command: str) -> dict[str, Any]:
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
            "nodules_per_training_scan": "0-4 (seeded)",
            "seed": cfg.seed, "steps": result.step, "network": {
                "type": "monai.networks.nets.UNet", "channels": list(cfg.channels),
                "num_res_units": cfg.num_res_units},
            "command": command, "seconds": round(result.seconds),
            "device": training_device().type,
            "precision": training_precision(cfg),
            "loss": loss_description(cfg),
            "checkpoint": "best validation Dice",
        },
    )
    return fields


def score_and_register(cfg: TrainConfig, result: TrainResult, command: str) -> dict[str, Any]:
    """The first stage alone: held-out figures (after choosing its operating point on the calibration split), CPU
    timing, and registration in `register_to` when set; returns the card's metrics and the model folder."""
    fields = first_stage_fields(cfg, result, command)
    test = data_split(cfg, "test") if cfg.data.n_test else []
    figures_dir = Path(tempfile.mkdtemp(prefix="dxgate-figures-"))
    metrics = score_exported(result.net, fields, test, cfg, figures_dir)
    if cfg.benchmark:
        metrics["timing"] = cpu_benchmark(result.net, cfg)
    metrics["validation_dice"] = result.best_metric
    fields["metrics"] = metrics
    if cfg.register_to is None:
        return {"metrics": metrics}
    figures = {name: figures_dir / name for name in metrics.get("figures", [])}
    folder = register_model(result.net, fields, cfg.register_to, extra_files=figures)
    return {"registered": str(folder), "metrics": metrics}
