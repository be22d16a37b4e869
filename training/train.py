"""MONAI training workflow for the two dxgate tasks: data -> cached transforms -> U-Net -> checkpoints.

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
from typing import Any, Literal

import numpy as np
import torch
import yaml
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import DiceMetric
from monai.transforms import Compose
from monai.utils import set_determinism
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inference.model_card import check_flip_axes
from training.datasets import generate_dataset
from training.hard_negatives import CASE_KEY, HardNegativeIndicesd, HardNegativeStore, mine
from training.networks import build_network
from training.nodule_insertion import KIND_WEIGHTS
from training.run_log import TrainingLog, logged_seconds
from training.transforms import SPINE_LEVELS, augment_transforms, crop_size, load_transforms

Task = Literal["lung-nodule", "spine-vertebrae"]


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Cfg):
    dir: Path                                # datasets/<name>/generated
    n_train: int = Field(ge=1)
    n_val: int = Field(default=2, ge=1)
    n_test: int = Field(default=20, ge=0)
    seed: int = 1000                         # training cases use seed .. seed + n_train - 1
    val_seed: int = 5000
    test_seed: int = 9000                    # held-out cases: never overlaps the training seeds
    rows: int = 512
    test_rows: int | None = None             # held-out resolution (default: rows)
    n_calibration: int = Field(default=0, ge=0)  # operating-point scans (at test_rows), never trained on
    calibration_seed: int = 6000
    slices: int | None = None
    spacing: tuple[float, float, float] | None = None  # generator spacing (z, y, x); None = its default
    train_nodules: int | None = Field(default=None, ge=0)  # nodules per training chest CT (None: the generator's 0-4)
    phantom: bool = False                    # tiny built-in phantom (tests only)


class InsertionConfig(_Cfg):
    """What `training.nodule_insertion.RandInsertNoduled` draws (defaults: the generator's distribution)."""

    small_fraction: float = Field(default=0.0, ge=0.0, le=1.0)   # diameters uniform in 3..small_max_mm
    small_max_mm: float = Field(default=8.0, gt=3.0)
    juxtapleural_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    kind_weights: tuple[float, float, float] = KIND_WEIGHTS       # solid, part-solid, ground glass
    vessel_fraction: float = Field(default=0.0, ge=0.0, le=1.0)  # centred against a vessel / dense tissue


class TrainConfig(_Cfg):
    task: Task
    name: str
    data: DataConfig
    spacing_mm: tuple[float, float, float]
    window: tuple[float, float]
    roi_size: tuple[int, int, int]
    overlap: float = 0.25
    flips: list[tuple[int, ...]] = []        # the card's test-time flips (inference.model_pass), used in evaluation
    channels: tuple[int, ...] = (8, 16, 32, 64)
    num_res_units: int = 1
    steps: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=1, ge=1)      # volumes per step
    num_samples: int = Field(default=2, ge=1)     # patches per volume
    pos: float = 1.0
    neg: float = 1.0
    lr: float = 2e-3
    weight_decay: float = 1e-5
    val_every: int = 100
    seed: int = 0
    threads: int | None = None
    run_dir: Path = Path("training/runs/default")
    register_to: Path | None = None
    resume: bool = True
    init_from: Path | None = None             # a fresh run starts from these network weights (best.pt / last.pt)
    probability: float = 0.5
    insert_nodules: float = 0.0              # lung: probability of painting an extra nodule into a patch
    insertion: InsertionConfig = Field(default_factory=lambda: InsertionConfig())
    hard_negative_every: int | None = Field(default=None, ge=1)  # lung: mine false positives every N steps
    hard_negative_weight: float = Field(default=1.0, ge=0.0)     # their patch-sampling weight (as `pos`)
    hard_negative_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    operating_fp_per_scan: float | None = Field(default=None, gt=0)  # lung: threshold chosen on calibration
    hard_voxel_fraction: float | None = Field(default=None, gt=0.0, le=1.0)  # lung: BCE over the hardest voxels only
    nodule_weight: float = Field(default=0.0, ge=0.0)  # lung: + this x BCE averaged per nodule, then over nodules
    checkpoint: Literal["best", "last"] = "best"  # registered: best validation Dice, or the last step
    cpu_bf16: bool = False                    # CPU: bfloat16 autocast + channels-last (where the CPU has bf16)
    benchmark: bool = True                    # time the exported model on a 300 x 512 x 512 chest CT grid

    _flip_axes = field_validator("flips")(check_flip_axes)   # refused before training, not at registration

    @model_validator(mode="after")
    def _roi_fits_the_network(self) -> TrainConfig:
        factor = 2 ** (len(self.channels) - 1)
        if any(r % factor for r in self.roi_size):
            raise ValueError(f"roi_size {self.roi_size} must be divisible by {factor} ({len(self.channels)} levels)")
        return self

    @property
    def out_channels(self) -> int:
        return 1 if self.task == "lung-nodule" else 1 + len(SPINE_LEVELS)


def load_config(path: Path, **overrides: Any) -> TrainConfig:
    """Read a YAML training config; `overrides` replace top-level keys."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    raw.update(overrides)
    return TrainConfig.model_validate(raw)


@dataclass
class TrainResult:
    net: torch.nn.Module
    run_dir: Path
    step: int
    best_metric: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def cpu_has_bf16() -> bool:
    """True where oneDNN has native bfloat16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def training_precision(cfg: TrainConfig) -> str:
    """What `train` runs `cfg` under on this machine, for the model card."""
    if torch.cuda.is_available():
        return "amp float16"
    return "bfloat16 autocast" if cfg.cpu_bf16 and cpu_has_bf16() else "float32"


def make_network(cfg: TrainConfig) -> torch.nn.Module:
    return build_network(cfg.out_channels, channels=cfg.channels, num_res_units=cfg.num_res_units)


class _DiceWeightedCE(torch.nn.Module):
    """Batch Dice over the foreground levels plus cross-entropy with a down-weighted background.

    With 25 levels and a handful in any patch, plain Dice+CE lets the network settle on "all background"
    for hundreds of steps; weighting the background class of the CE term breaks that quickly.
    """

    def __init__(self, channels: int, background_weight: float = 0.1) -> None:
        super().__init__()
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
                             smooth_nr=1e-5, smooth_dr=1e-5)
        weight = torch.ones(channels)
        weight[0] = background_weight
        self.ce = torch.nn.CrossEntropyLoss(weight=weight)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.ce.weight = self.ce.weight.to(logits.device)
        return self.dice(logits, label) + self.ce(logits, label[:, 0].long())


def per_nodule_mean(voxel_loss: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean of `voxel_loss` [B, 1, Z, Y, X] over each nodule (26-connected component of label > 0.5 in
    one patch), then over the nodules of the batch; 0 when the batch holds none.

    Every nodule weighs the same, whatever its size: in a voxel mean (or batch Dice) a missed 4 mm nodule
    (~10 voxels at 1.5 mm) is outweighed ~100x by a 20 mm one, and the network may ignore small ones.
    """
    from scipy import ndimage

    masks = (label.detach() > 0.5).cpu().numpy()
    means = []
    for b in range(masks.shape[0]):
        components, n = ndimage.label(masks[b, 0], structure=np.ones((3, 3, 3), dtype=bool))
        if n == 0:
            continue
        ids = torch.from_numpy(components.astype(np.int64)).to(voxel_loss.device).flatten()
        sums = torch.zeros(n + 1, dtype=voxel_loss.dtype, device=voxel_loss.device)
        sums = sums.index_add(0, ids, voxel_loss[b, 0].flatten())
        counts = torch.bincount(ids, minlength=n + 1).to(voxel_loss.dtype)
        means.append(sums[1:] / counts[1:])
    return torch.cat(means).mean() if means else voxel_loss.sum() * 0.0


class DiceHardVoxelBCE(torch.nn.Module):
    """Batch Dice plus BCE averaged over the hardest `fraction` of voxels (top-k cross-entropy), plus
    `nodule_weight` x BCE averaged per nodule (`per_nodule_mean`).

    Plain BCE is a mean over ~400 000 voxels per batch, so a confident false-positive blob of 50 voxels
    moves it by about 1e-3 and the network keeps it. Averaging over the hardest few percent only (which
    always include missed nodule voxels and confident false positives) makes both count.
    """

    def __init__(self, fraction: float, nodule_weight: float = 0.0) -> None:
        super().__init__()
        self.fraction = fraction
        self.nodule_weight = nodule_weight
        self.dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, label.float(), reduction="none")
        k = max(1, int(self.fraction * bce.numel()))
        loss = self.dice(logits, label) + bce.flatten().topk(k, sorted=False).values.mean()
        if self.nodule_weight > 0:
            loss = loss + self.nodule_weight * per_nodule_mean(bce, label)
        return loss


def make_loss(cfg: TrainConfig) -> torch.nn.Module:
    if cfg.task == "lung-nodule":
        if cfg.hard_voxel_fraction is not None:
            return DiceHardVoxelBCE(cfg.hard_voxel_fraction, cfg.nodule_weight)
        # BCE keeps a full-size gradient on missed nodule voxels (focal/Dice alone stall at p ~ 0)
        return DiceCELoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
    return _DiceWeightedCE(cfg.out_channels)


def data_split(cfg: TrainConfig, section: str, progress: bool = True) -> list[dict[str, Any]]:
    """Generate (or reuse) one split: "training", "validation", "test" or "calibration"."""
    n, seed = {"training": (cfg.data.n_train, cfg.data.seed), "validation": (cfg.data.n_val, cfg.data.val_seed),
               "test": (cfg.data.n_test, cfg.data.test_seed),
               "calibration": (cfg.data.n_calibration, cfg.data.calibration_seed)}[section]
    rows = cfg.data.test_rows if section in ("test", "calibration") and cfg.data.test_rows else cfg.data.rows
    return generate_dataset(
        cfg.task, cfg.data.dir, section, n, seed, rows=rows, slices=cfg.data.slices,
        spacing=cfg.data.spacing, phantom=cfg.data.phantom, progress=progress,
        nodules=cfg.data.train_nodules if section == "training" else None,
        workers=cfg.threads or min(2, os.cpu_count() or 1),
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


def initial_weights(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """Network weights to start from: a `best.pt` state dict or a `last.pt` checkpoint (its "net")."""
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no checkpoint at {path}")
    state = torch.load(path, map_location=device, weights_only=False)
    return state["net"] if isinstance(state, dict) and "net" in state else state


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train (resuming from run_dir/last.pt when present and cfg.resume); returns the best network."""
    start = time.monotonic()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_determinism(seed=cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    net = make_network(cfg).to(device)
    last = run_dir / "last.pt"
    if cfg.init_from is not None and not (cfg.resume and last.is_file()):
        net.load_state_dict(initial_weights(cfg.init_from, device))
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
    step, best, history, earlier = 0, -1.0, [], 0.0
    if cfg.resume and last.is_file():
        state = torch.load(last, map_location=device, weights_only=False)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        scaler.load_state_dict(state["scaler"])
        step, best, history = state["step"], state["best"], state["history"]
        earlier = float(state.get("seconds", logged_seconds(run_dir / "log.csv", step)))
    start -= earlier  # the reported time covers every invocation of this run

    mining = cfg.task == "lung-nodule" and cfg.hard_negative_every is not None
    hard = HardNegativeStore()
    if mining and (run_dir / "hard_negatives.npz").is_file() and step > 0:
        hard.load(run_dir / "hard_negatives.npz")
    if step < cfg.steps:  # a finished run only reloads its best network (e.g. to re-evaluate and register)
        train_data = [{**e, CASE_KEY: i} for i, e in enumerate(data_split(cfg, "training", progress))]
        val_data = data_split(cfg, "validation", progress)
        load = load_transforms(cfg.task, cfg.spacing_mm, cfg.window)
        cached = load_transforms(cfg.task, cfg.spacing_mm, cfg.window, compact=True,
                                 pad_to=crop_size(cfg.roi_size))
        augment = augment_transforms(cfg.task, cfg.roi_size, cfg.num_samples, cfg.pos, cfg.neg,
                                     insert_nodules=cfg.insert_nodules, window=cfg.window, spacing=cfg.spacing_mm,
                                     hard=cfg.hard_negative_weight if mining else 0.0,
                                     insertion=cfg.insertion.model_dump())
        if mining:
            augment = [HardNegativeIndicesd(hard), *augment]
        train_ds = CacheDataset(train_data, Compose(cached + augment), num_workers=0, progress=False)
        val_volumes = list(CacheDataset(val_data, Compose(load), num_workers=0, progress=False))
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, num_workers=0, drop_last=False)

    log = TrainingLog(run_dir / "log.csv", step)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.name}", unit="step")
    net.train()
    try:
        while step < cfg.steps:
            for batch in loader:
                if step >= cfg.steps:
                    break
                x, y = batch["image"].to(device), batch["label"].to(device)
                if cpu_bf16:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, enabled=amp or cpu_bf16,
                                    dtype=torch.bfloat16 if cpu_bf16 else None):
                    loss = loss_fn(net(x), y)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                step += 1
                val = None
                if step % cfg.val_every == 0 or step == cfg.steps:
                    val = validate(net, val_volumes, cfg)
                    if val >= best:  # ties: prefer the later network
                        best = val
                        torch.save(net.state_dict(), run_dir / "best.pt")
                entry = {"step": step, "loss": float(loss.item()), "val_dice": val}
                history.append(entry)
                log.row(step, entry["loss"], sched.get_last_lr()[0], val, time.monotonic() - start)
                if mining and step % cfg.hard_negative_every == 0 and step < cfg.steps:
                    hard.centres = mine(net, train_data, Compose(cached), cfg.roi_size, cfg.overlap,
                                        cfg.hard_negative_threshold, bf16=cpu_bf16).centres
                    hard.save(run_dir / "hard_negatives.npz")
                    log.note(f"step {step}: {len(hard)} false positives mined from {len(hard.centres)} volumes")
                if val is not None:
                    torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                "scaler": scaler.state_dict(), "step": step, "best": best, "history": history,
                                "seconds": time.monotonic() - start}, last)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{entry['loss']:.3f}", best=f"{best:.3f}")
    finally:
        log.close()
        if bar is not None:
            bar.close()
    # `net` is the last step's network here (trained to the end, or a finished run resumed from last.pt)
    if cfg.checkpoint == "best" and (run_dir / "best.pt").is_file():
        net.load_state_dict(torch.load(run_dir / "best.pt", map_location=device, weights_only=True))
    net = net.to("cpu", memory_format=torch.contiguous_format).eval()
    return TrainResult(net=net, run_dir=run_dir, step=step, best_metric=best, history=history,
                       seconds=time.monotonic() - start)
