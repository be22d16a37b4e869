"""The lung nodule second stage's classifier: a small 3D CNN that scores `inference.candidates` blob candidates.

Training data are the candidates of generated chest CTs that no evaluation uses (8 nodules each): candidates
within a nodule's radius (nodules <= 12 mm; larger ones are the first stage's) and jittered nodule centres are
positive, `n_neg` other candidates per CT negative. A second round draws most negatives from the candidates a
first classifier scores highest (hard negatives) and fine-tunes it. A round may also paint fresh synthetic nodules
into some of each batch's negatives (`paint_nodules`), which then count as positives: a few hundred generated
nodules are otherwise all the positives there are.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from inference.candidates import ISO_MM, PATCH_MM, WINDOW, chest_candidates, patches, to_iso, to_u8
from training.device import cpu_has_bf16, training_device
from training.nodule_insertion import RandInsertNoduled
from training.run_log import TrainingLog
from training.synthetic.chest_ct import JUXTAPLEURAL_FRACTION, generate_chest_ct

STORED = 32                    # stored patch edge: the network sees a 24 mm crop of it, jittered +-2 mm
MAX_DIAMETER_MM = 12.0         # larger nodules are the first stage's (it finds every 10-30 mm one)
PAINTED_MAX_MM = 10.0          # painted nodules: 3-10 mm, where the pair's misses are
PAINTED_KINDS = (0.4, 0.3, 0.3)  # solid, part-solid, ground glass: ground glass more often than generated


def _to_mm(idx: np.ndarray, origin: Sequence[float]) -> np.ndarray:
    """1 mm grid indices (z, y, x) of an axis-aligned generated CT -> patient (x, y, z) mm."""
    idx = np.asarray(idx, dtype=float).reshape(-1, 3)
    return np.asarray(origin, dtype=float)[None, :] + idx[:, ::-1]


def _to_idx(mm: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    return (np.asarray(mm, dtype=float) - np.asarray(origin, dtype=float))[::-1]


def training_patches(seed: int, nodules: int = 8, n_neg: int = 700, rows: int = 512, slices: int | None = None,
                     hard: nn.Module | None = None, n_hard: int = 500,
                     juxtapleural_fraction: float = JUXTAPLEURAL_FRACTION) -> tuple[np.ndarray, np.ndarray, int]:
    """Labelled patches (`STORED` mm) of one generated chest CT: (patches, labels 1/0, candidate count).

    With a classifier `hard`, `n_hard` of the `n_neg` negatives are those it scores highest (hard negatives)."""
    rng = np.random.default_rng(seed)
    sv = generate_chest_ct(seed, nodules=nodules, rows=rows, slices=slices, juxtapleural_fraction=juxtapleural_fraction)
    iso = to_iso(sv.hu, tuple(sv.spacing))
    found = chest_candidates(iso)
    u8 = to_u8(iso)
    del iso
    pk, mm = found.index, _to_mm(found.index, sv.origin)
    lab = np.zeros(len(pk), dtype=np.int8)      # 1 positive, 0 negative, -1 left out (edge or large nodule)
    extra = []
    for n in sv.nodules:
        c = np.asarray(n.centre_mm)
        r = n.diameter_mm / 2
        d = np.linalg.norm(mm - c, axis=1)
        if n.diameter_mm > MAX_DIAMETER_MM:
            lab[d < r + 2] = -1
            continue
        lab[(d < r) & (lab == 0)] = 1
        lab[(d >= r) & (d < r + 1.0) & (lab == 0)] = -1
        j = _to_idx(c, sv.origin)
        for _ in range(6):
            extra.append(np.round(j + rng.uniform(-0.5, 0.5, 3) * min(r, 2.0)).astype(int))
    pos = np.nonzero(lab == 1)[0]
    neg = np.nonzero(lab == 0)[0]
    if hard is not None and len(neg) > n_neg:
        top = neg[np.argsort(-score(hard, patches(u8, pk[neg], STORED)))[:min(n_hard, n_neg)]]
        rest = np.setdiff1d(neg, top)
        neg = np.concatenate([top, rng.choice(rest, n_neg - len(top), replace=False)])
    else:
        neg = rng.choice(neg, min(n_neg, len(neg)), replace=False)
    idx = np.concatenate([pk[pos], np.asarray(extra, dtype=int).reshape(-1, 3), pk[neg]])
    y = np.concatenate([np.ones(len(pos) + len(extra)), np.zeros(len(neg))]).astype(np.uint8)
    return patches(u8, idx, STORED), y, len(pk)


def _block(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Conv3d(i, o, 3, padding=1, bias=False), nn.BatchNorm3d(o), nn.ReLU(inplace=True))


class CandidateNet(nn.Module):
    """Nodule-or-not logit of a 24 mm patch at 1 mm: [N, 1, 24, 24, 24] in [0, 1] -> [N, 1, 1, 1, 1].

    0.18 M parameters: a stride-2 3x3x3 stem (24 -> 12 voxels), then one convolution at 12, two at 6 and one at 3
    voxels. The stem, instead of a full-resolution convolution and a pooling, makes a 64-patch bfloat16 training
    step about 3 times faster on 2 CPU cores (63 against 184 ms, AVX512-BF16), so a round's minutes hold about
    3 times the steps (the shipped run: 6579 + 5137 + 4906 against 2200 + 1835 + 1810).
    The output keeps five axes so the model folder has the same Triton layout as the segmentation models
    (`training.register.config_pbtxt`)."""

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 48)) -> None:
        super().__init__()
        a, b, c = channels
        self.f = nn.Sequential(nn.Conv3d(1, a, 3, stride=2, padding=1, bias=False), nn.BatchNorm3d(a),
                               nn.ReLU(inplace=True), _block(a, b), nn.MaxPool3d(2), _block(b, c), _block(c, c),
                               nn.MaxPool3d(2), _block(c, c), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)[:, :, None, None, None]


def load_classifier(path: Path) -> CandidateNet:
    """A trained `CandidateNet` from its state dict."""
    net = CandidateNet()
    net.load_state_dict(torch.load(path, map_location="cpu"))
    return net


def _crop(x: np.ndarray, off: Any) -> np.ndarray:
    return x[:, off[0]:off[0] + PATCH_MM, off[1]:off[1] + PATCH_MM, off[2]:off[2] + PATCH_MM]


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random 24 mm crop (+-2 mm around the centre), flips, and a y/x swap (not z: slice thickness differs)."""
    c = (STORED - PATCH_MM) // 2
    x = _crop(x, rng.integers(c - 2, c + 3, 3))
    for ax in (1, 2, 3):
        if rng.uniform() < 0.5:
            x = np.flip(x, ax)
    if rng.uniform() < 0.5:
        x = np.swapaxes(x, 2, 3)
    return np.ascontiguousarray(x)


def nodule_painter(seed: int) -> RandInsertNoduled:
    """Paints one fresh synthetic nodule (`training.nodule_insertion`: 3-10 mm, more ground glass than the
    generator draws, 30 % on the pleura, half of the rest abutting a vessel) within 2 mm of a patch's centre."""
    painter = RandInsertNoduled(("image", "label"), WINDOW, (ISO_MM,) * 3, prob=1.0, small_fraction=1.0,
                                small_max_mm=PAINTED_MAX_MM, juxtapleural_fraction=JUXTAPLEURAL_FRACTION,
                                kind_weights=PAINTED_KINDS, vessel_fraction=0.5, centre_within_mm=2.0)
    painter.set_random_state(seed)
    return painter


def paint_nodules(x: np.ndarray, y: np.ndarray, painter: RandInsertNoduled, want: int) -> int:
    """Paint a nodule into negatives of the batch `x` (uint8 [N, s, s, s], labels `y`), trying at most 2 * `want`
    of them (a patch centred in a vessel or the wall has no lung for one), until `want` took; those become
    positives. Returns how many did."""
    done = 0
    for j in np.flatnonzero(y == 0)[:2 * want]:
        if done == want:
            break
        out = painter({"image": x[j][None].astype(np.float32) / 255.0, "label": np.zeros((1, *x[j].shape), np.uint8)})
        if out["label"].any():
            x[j] = np.round(out["image"][0] * 255.0).astype(np.uint8)
            y[j] = 1
            done += 1
    return done


def memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last on CUDA; the default layout on the CPU, where this network's bfloat16 training step takes
    141 ms against 241 ms channels-last (64 patches, 2 cores with AMX; float32: 283 against 302 ms)."""
    return torch.channels_last_3d if device.type == "cuda" else torch.contiguous_format


def _autocast(device: torch.device = torch.device("cpu")) -> Any:
    """bfloat16 autocast on CUDA, and on a CPU with native bfloat16 (AVX512-BF16 / AMX); emulated it is ~50x
    slower, so other CPUs run float32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16) if cpu_has_bf16() else nullcontext()


def precision(device: torch.device) -> str:
    """What `_autocast` runs on `device`, for the model card."""
    return "bfloat16 autocast" if device.type == "cuda" or cpu_has_bf16() else "float32"


def _tensor(x: np.ndarray, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    t = torch.from_numpy(x.astype(np.float32) / 255.0)[:, None].to(device)
    return t.contiguous(memory_format=memory_format(device))


def score(net: nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Classifier probabilities of stored patches (centre crop), on the device the network is on."""
    net.eval()
    device = next(net.parameters(), torch.zeros(0)).device   # a network without weights: the CPU
    out = []
    c = (x.shape[1] - PATCH_MM) // 2
    with torch.no_grad(), _autocast(device):
        for i in range(0, len(x), batch):
            logit = net(_tensor(_crop(x[i:i + batch], (c, c, c)), device)).reshape(-1).float()
            out.append(torch.sigmoid(logit).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def _patch_file(out: Path, seed: int, hard: Path | None, options: dict[str, Any]) -> None:
    f = out / f"train_{seed}.npz"
    if f.exists():
        return
    torch.set_num_threads(1)
    x, y, n = training_patches(seed, hard=None if hard is None else load_classifier(hard), **options)
    tmp = f.with_suffix(".tmp.npz")
    np.savez(tmp, x=x, y=y, candidates=n)
    tmp.replace(f)


def write_patches(out: Path, seeds: Sequence[int], hard: Path | None = None, workers: int = 2,
                  log: Callable[[str], None] = print, **options: Any) -> None:
    """One `train_<seed>.npz` per seed (skipped when it exists), `workers` CTs at a time; `options` go to
    `training_patches` (rows, slices, n_neg, ...)."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [s for s in seeds if not (out / f"train_{s}.npz").exists()]
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for k, _ in enumerate(pool.map(_patch_file, [out] * len(todo), todo, [hard] * len(todo),
                                                       [options] * len(todo)), start=1):
            log(f"patches {out.name}: {k}/{len(todo)} CTs, {time.time() - t0:.0f} s")


VALIDATE_EVERY = 200           # steps between validations, log flushes and resumable checkpoints


@dataclass
class _Patches:
    """Training and validation patches of a classifier (uint8 [N, s, s, s]) with their labels."""

    x: np.ndarray
    y: np.ndarray
    xv: np.ndarray
    yv: np.ndarray
    pos: np.ndarray = field(init=False)
    neg: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.pos, self.neg = np.nonzero(self.y == 1)[0], np.nonzero(self.y == 0)[0]


def _load_patches(patch_dirs: list[Path]) -> _Patches:
    """The first 4 files (by name) of the first folder and the first 2 of each further one are validation."""
    def load(fs: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        d = [np.load(f) for f in fs]
        return np.concatenate([z["x"] for z in d]), np.concatenate([z["y"] for z in d])

    train_files, val_files = [], []
    for i, d in enumerate(patch_dirs):
        fs = sorted(d.glob("train_*.npz"))
        k = min(4 if i == 0 else 2, len(fs) // 2)
        val_files += fs[:k]
        train_files += fs[k:]
    return _Patches(*load(train_files), *load(val_files))


@dataclass
class _ClassifierRun:
    """A classifier's training in progress, and what `<out>.last.pt` keeps of it."""

    net: nn.Module
    opt: torch.optim.Optimizer
    rng: np.random.Generator
    painter: RandInsertNoduled | None
    device: torch.device
    step: int = 0
    earlier: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    painted: int = 0

    def save(self, last: Path, seconds: float) -> None:
        state = {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "rng": self.rng.bit_generator.state,
                 "painter": None if self.painter is None else self.painter.R.get_state(), "step": self.step,
                 "seconds": seconds, "figures": self.figures, "painted": self.painted}
        torch.save(state, last.with_suffix(".tmp"))
        last.with_suffix(".tmp").replace(last)

    def resume(self, last: Path) -> None:
        state = torch.load(last, map_location=self.device, weights_only=False)
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.rng.bit_generator.state = state["rng"]
        if self.painter is not None:
            self.painter.R.set_state(state["painter"])
        self.step, self.earlier, self.figures, self.painted = (state["step"], state["seconds"], state["figures"],
                                                               state["painted"])


def _classifier_step(run: _ClassifierRun, data: _Patches, rate: float, painted: int) -> float:
    """One step on 16 positives + 48 negatives (up to `painted` of those made positives); returns the loss."""
    net, opt = run.net, run.opt
    net.train()
    for g in opt.param_groups:
        g["lr"] = rate
    bi = np.concatenate([run.rng.choice(data.pos, 16), run.rng.choice(data.neg, 48)])
    xb, yb = _augment(data.x[bi], run.rng), data.y[bi].copy()
    if run.painter is not None:
        run.painted += paint_nodules(xb, yb, run.painter, painted)
    with _autocast(run.device):
        logit = net(_tensor(xb, run.device)).reshape(-1)
    loss = nn.BCEWithLogitsLoss()(logit.float(), torch.from_numpy(yb.astype(np.float32)).to(run.device))
    opt.zero_grad()
    loss.backward()
    opt.step()
    run.step += 1
    return float(loss.item())


def _classifier_validation(run: _ClassifierRun, data: _Patches, loss: float, seconds: float) -> float:
    """The share of validation negatives scoring at least the 95 %-sensitivity threshold; sets `run.figures`."""
    sv = score(run.net, data.xv)
    th = float(np.quantile(sv[data.yv == 1], 0.05))
    val = float(np.mean(sv[data.yv == 0] >= th))
    run.figures = {"step": run.step, "seconds": round(seconds, 1), "loss": round(loss, 4),
                   "negatives_at_95pc_sensitivity": round(val, 5)}
    return val


def train_classifier(patch_dirs: list[Path], out: Path, steps: int | None = None, minutes: float | None = None,
                     lr: float = 2e-3, seed: int = 0, init: Path | None = None, painted: int = 0,
                     log: Callable[[str], None] = print, progress: bool = False,
                     validate_every: int = VALIDATE_EVERY) -> dict[str, float]:
    """Train `CandidateNet` for `steps` (deterministic: the same seed and data give the same weights on the same
    machine) or for `minutes` of wall time (the steps then depend on the machine), with a cosine learning rate
    over that budget; 16 positives + 48 negatives a batch, up to `painted` of those negatives made positives by
    `paint_nodules`; on the GPU when there is one (`training_device`; the weights load on the CPU either way).

    Validation patches as `_load_patches`; `init` starts from a trained classifier. Every `validate_every` steps:
    a row of validation figures in the log and `<out>.last.pt` (weights, optimiser, step and random states); a
    call that finds it resumes from it, so an interrupted step-budget round ends with the weights of an
    uninterrupted one. `out` (the weights alone) is written at the end. One CSV row per step in `<out>.csv` (step,
    loss, lr, validation, seconds), TensorBoard under `tb/<out stem>` when installed. Returns the last validation
    figures."""
    if (steps is None) == (minutes is None):
        raise ValueError("give a round either steps or minutes")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = _load_patches(patch_dirs)
    log(f"train positives {len(data.pos)} negatives {len(data.neg)}; validation {int(data.yv.sum())} / "
        f"{int((1 - data.yv).sum())}")
    device = training_device()
    net = CandidateNet() if init is None else load_classifier(init)
    net = net.to(device, memory_format=memory_format(device))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    run = _ClassifierRun(net, opt, rng, nodule_painter(seed) if painted else None, device)
    last = out.with_suffix(".last.pt")
    if last.is_file():
        run.resume(last)
        log(f"resuming {out.name} at step {run.step}")
    total = steps if steps is not None else (minutes or 0.0) * 60.0
    t0 = time.time() - run.earlier

    def fraction() -> float:   # of the budget spent
        return min(1.0, run.step / total if steps is not None else (time.time() - t0) / total)

    run_log = TrainingLog(out.with_suffix(".csv"), run.step, "negatives_at_95pc_sensitivity",
                          out.parent / "tb" / out.stem)
    bar = tqdm(total=steps, initial=run.step, desc=f"train {out.stem}", unit="step") if progress else None
    try:
        while fraction() < 1.0:
            rate = lr * 0.5 * (1 + np.cos(np.pi * fraction()))
            loss = _classifier_step(run, data, rate, painted)
            val = None
            if run.step % validate_every == 0 or fraction() >= 1.0:
                val = _classifier_validation(run, data, loss, time.time() - t0)
            run_log.row(run.step, loss, rate, val, time.time() - t0)
            if val is not None:
                log(json.dumps(run.figures))
                run.save(last, time.time() - t0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
    finally:
        run_log.close()
        if bar is not None:
            bar.close()
    torch.save(net.state_dict(), out)
    return {**run.figures, "steps": run.step, "painted": run.painted, "device": device.type}
