"""MONAI training workflow for the two segmentation tasks: data -> cached transforms -> U-Net -> checkpoints.

One loop serves both tasks: label-aware patches (RandCropByLabelClassesd: each nodule or level drawn
equally often, nodule negatives mostly from the lungs), Dice + BCE (nodules, sigmoid; optionally BCE over
the hardest voxels only) or Dice + background-weighted CE (vertebrae, softmax), AdamW with cosine decay,
AMP on CUDA (bfloat16 autocast on CPUs that have it, with `cpu_bf16`), a CSV log (and TensorBoard when
installed), periodic sliding-window validation, `last.pt` for resume and `best.pt`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.transforms import Compose
from monai.utils import set_determinism
from tqdm import tqdm

from training.config import TrainConfig
from training.datasets import generate_dataset
from training.device import cpu_has_bf16, training_device
from training.losses import make_loss
from training.networks import build_network
from training.run_log import TrainingLog, logged_seconds
from training.transforms import augment_transforms, crop_size, load_transforms


@dataclass
class TrainResult:
    net: torch.nn.Module
    run_dir: Path
    step: int
    best_metric: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def training_precision(cfg: TrainConfig) -> str:
    """What `train` runs `cfg` under on this machine, for the model card."""
    if torch.cuda.is_available():
        return "amp float16"
    return "bfloat16 autocast" if cfg.cpu_bf16 and cpu_has_bf16() else "float32"


def make_network(cfg: TrainConfig) -> torch.nn.Module:
    return build_network(cfg.out_channels, channels=cfg.channels, num_res_units=cfg.num_res_units)


def data_split(cfg: TrainConfig, section: str, progress: bool = True) -> list[dict[str, Any]]:
    """Generate (or reuse) one split: "training", "validation", "test" or "calibration"."""
    n, seed = {"training": (cfg.data.n_train, cfg.data.seed), "validation": (cfg.data.n_val, cfg.data.val_seed),
               "test": (cfg.data.n_test, cfg.data.test_seed),
               "calibration": (cfg.data.n_calibration, cfg.data.calibration_seed)}[section]
    rows = cfg.data.test_rows if section in ("test", "calibration") and cfg.data.test_rows else cfg.data.rows
    return generate_dataset(
        cfg.task, cfg.data.dir, section, n, seed, rows=rows, slices=cfg.data.slices, phantom=cfg.data.phantom,
        progress=progress, workers=cfg.threads or min(2, os.cpu_count() or 1),
    )


def predict_volume(net: torch.nn.Module, image: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Sliding-window logits [1, C, Z, Y, X] for one preprocessed volume [1, Z, Y, X]."""
    device = next(net.parameters()).device
    with torch.no_grad():
        return sliding_window_inference(
            image[None].float().to(device), cfg.roi_size, sw_batch_size=1, predictor=net, overlap=cfg.overlap,
            mode="gaussian", padding_mode="constant", cval=0.0,
        ).cpu()


def validate(net: torch.nn.Module, volumes: list[dict[str, torch.Tensor]], cfg: TrainConfig) -> float:
    """Mean foreground Dice over the validation volumes (labels absent from a volume are not scored)."""
    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
    net.eval()
    for item in volumes:
        logits = predict_volume(net, item["image"], cfg)
        label = item["label"][None].long()
        if cfg.task == "lung-nodule":
            pred = (torch.sigmoid(logits) > cfg.probability).long()
            pred, label = torch.cat([1 - pred, pred], 1), torch.cat([1 - label, label], 1)
        else:
            n = cfg.out_channels
            pred = torch.nn.functional.one_hot(logits.argmax(1), n).permute(0, 4, 1, 2, 3)
            label = torch.nn.functional.one_hot(label[:, 0], n).permute(0, 4, 1, 2, 3)
        metric(pred, label)
    net.train()
    value = float(metric.aggregate().item())
    metric.reset()
    return value


@dataclass
class _Run:
    """One training run in progress: network, optimiser state, step, best validation Dice, history."""

    net: torch.nn.Module
    loss_fn: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: bool
    cpu_bf16: bool
    start: float
    step: int = 0
    best: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def checkpoint(self, path: Path) -> None:
        torch.save({"net": self.net.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                    "scaler": self.scaler.state_dict(), "step": self.step, "best": self.best,
                    "history": self.history, "seconds": time.monotonic() - self.start}, path)


def _start_run(cfg: TrainConfig, device: torch.device, start: float) -> _Run:
    """A fresh network and optimiser, or the state of run_dir/last.pt when resuming."""
    net = make_network(cfg).to(device)
    loss_fn = make_loss(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # closed-form cosine decay to 2 % of lr: a resumed run with more steps continues on the longer curve
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
    )
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    cpu_bf16 = device.type == "cpu" and cfg.cpu_bf16 and cpu_has_bf16()
    if cpu_bf16:  # oneDNN's bf16 convolutions want channels-last; weights and optimiser stay float32
        net = net.to(memory_format=torch.channels_last_3d)
    run = _Run(net, loss_fn, opt, sched, scaler, device, amp, cpu_bf16, start)
    last = cfg.run_dir / "last.pt"
    if cfg.resume and last.is_file():
        state = torch.load(last, map_location=device, weights_only=False)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        scaler.load_state_dict(state["scaler"])
        run.step, run.best, run.history = state["step"], state["best"], state["history"]
        run.start -= float(state.get("seconds", logged_seconds(cfg.run_dir / "log.csv", run.step)))
    return run   # its `start` is moved back by the earlier invocations: the reported time covers them all


def _training_data(cfg: TrainConfig, progress: bool) -> tuple[DataLoader, list[dict[str, Any]]]:
    """The training loader (cached deterministic part + random patches) and the validation volumes."""
    train_data = data_split(cfg, "training", progress)
    val_data = data_split(cfg, "validation", progress)
    load = load_transforms(cfg.task, cfg.spacing_mm, cfg.window)
    cached = load_transforms(cfg.task, cfg.spacing_mm, cfg.window, compact=True, pad_to=crop_size(cfg.roi_size))
    augment = augment_transforms(cfg.task, cfg.roi_size, cfg.num_samples, cfg.pos, cfg.neg,
                                 insert_nodules=cfg.insert_nodules, window=cfg.window, spacing=cfg.spacing_mm)
    train_ds = CacheDataset(train_data, Compose(cached + augment), num_workers=0, progress=False)
    val_volumes = list(CacheDataset(val_data, Compose(load), num_workers=0, progress=False))
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, num_workers=0, drop_last=False)
    return loader, val_volumes


def _step(run: _Run, batch: dict[str, torch.Tensor]) -> float:
    """One optimiser step on a batch of patches; returns the loss."""
    x, y = batch["image"].to(run.device), batch["label"].to(run.device)
    if run.cpu_bf16:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    run.opt.zero_grad(set_to_none=True)
    with torch.autocast(run.device.type, enabled=run.amp or run.cpu_bf16,
                        dtype=torch.bfloat16 if run.cpu_bf16 else None):
        loss = run.loss_fn(run.net(x), y)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()
    run.step += 1
    return float(loss.item())


def _loop(cfg: TrainConfig, run: _Run, loader: Any, val_volumes: list[dict[str, Any]], bar: Any) -> None:
    """Steps until cfg.steps: validation (best.pt), a log row per step and last.pt at each validation."""
    log = TrainingLog(cfg.run_dir / "log.csv", run.step)
    run.net.train()
    try:
        while run.step < cfg.steps:
            for batch in loader:
                if run.step >= cfg.steps:
                    break
                loss = _step(run, batch)
                val = None
                if run.step % cfg.val_every == 0 or run.step == cfg.steps:
                    val = validate(run.net, val_volumes, cfg)
                    if val >= run.best:  # ties: prefer the later network
                        run.best = val
                        torch.save(run.net.state_dict(), cfg.run_dir / "best.pt")
                run.history.append({"step": run.step, "loss": loss, "val_dice": val})
                log.row(run.step, loss, run.sched.get_last_lr()[0], val, time.monotonic() - run.start)
                if val is not None:
                    run.checkpoint(cfg.run_dir / "last.pt")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", best=f"{run.best:.3f}")
    finally:
        log.close()


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train (resuming from run_dir/last.pt when present and cfg.resume); returns the best network."""
    start = time.monotonic()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_determinism(seed=cfg.seed)
    device = training_device()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    run = _start_run(cfg, device, start)
    loader, val_volumes = None, []
    if run.step < cfg.steps:  # a finished run only reloads its best network (e.g. to re-evaluate and register)
        loader, val_volumes = _training_data(cfg, progress)
    bar = tqdm(total=cfg.steps, initial=run.step, desc=f"train {cfg.name}", unit="step") if progress else None
    try:
        _loop(cfg, run, loader, val_volumes, bar)
    finally:
        if bar is not None:
            bar.close()
    net = run.net   # the last step's network (trained to the end, or a finished run resumed from last.pt)
    if (cfg.run_dir / "best.pt").is_file():
        net.load_state_dict(torch.load(cfg.run_dir / "best.pt", map_location=device, weights_only=True))
    net = net.to("cpu", memory_format=torch.contiguous_format).eval()
    return TrainResult(net=net, run_dir=cfg.run_dir, step=run.step, best_metric=run.best, history=run.history,
                       seconds=time.monotonic() - run.start)
