"""Experiment (not served): a second stage that scores blob candidates found at 1 mm, beside the lung model.

The lung model misses small nodules against a vessel or the pleura with probabilities near 0, so no threshold
or post-processing of its map recovers them. This probe adds candidates it does not depend on and a classifier:

1. candidates: maxima of the scale-normalised Laplacian of Gaussian (sigma 1.0-2.8 mm, HU clipped to
   [-1000, 100]) on the CT resampled to 1 mm, inside the lungs closed by 6 mm (so juxtapleural and vessel-attached
   nodules stay in); about 2000-4000 per 512-row chest CT. `wall_candidates` adds the ground-glass nodules on the
   pleura that the wall's edge hides from the plain LoG (50-900 more per CT).
2. a small 3D CNN (`CandidateNet`, 0.33 M parameters) scores a 28 mm patch around each candidate; it is trained
   on candidates of generated CTs that no evaluation uses (seeds 3000-3119, 8 nodules each): candidates within a
   nodule's radius (nodules <= 12 mm) and jittered nodule centres are positive, 700 other candidates per CT
   negative (for seeds 3060-3119, 500 of them the ones a first classifier scores highest: hard negatives).
3. the FROC candidates are the first stage's components (as `training.cli.nodule_candidates` makes them) plus
   every blob candidate with the classifier's probability (`union`), or other combinations (`COMBINATIONS`).

Commands (each resumes by skipping outputs that exist):

    python -m training.two_stage_probe patches OUT_DIR 3000 3060
    python -m training.two_stage_probe train PATCH_DIR CLASSIFIER.pt --minutes 22
    python -m training.two_stage_probe patches HARD_DIR 3060 3120 --hard CLASSIFIER.pt
    python -m training.two_stage_probe train PATCH_DIR HARD_DIR CLASSIFIER_2.pt --minutes 25 --lr 1e-3 \
        --init CLASSIFIER.pt
    python -m training.two_stage_probe maps MODEL_DIR DATALIST SPLIT MAP_DIR
    python -m training.two_stage_probe candidates DATALIST SPLIT CANDIDATE_DIR
    python -m training.two_stage_probe wall-candidates DATALIST SPLIT CANDIDATE_DIR WALL_DIR
    python -m training.two_stage_probe evaluate CLASSIFIER_2.pt DATALIST SPLIT MAP_DIR CANDIDATE_DIR \
        --extra WALL_DIR --cache CACHE_DIR
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

SIGMAS_MM = (1.0, 1.4, 2.0, 2.8)   # blob radius ~ sigma * sqrt(3): 3.5-10 mm nodules
LOG_FLOOR = 40.0                   # scale-normalised LoG response (HU) a candidate must exceed
PATCH = 32                         # stored patch edge (voxels of 1 mm); the network sees a 28 mm crop
CROP = 28
MAX_DIAMETER_MM = 12.0             # larger nodules are the first stage's (it finds every 10-30 mm one)
WINDOW = (-1000.0, 400.0)


def zoom_iso(hu: np.ndarray, spacing: tuple[float, float, float], iso_mm: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear resampling to `iso_mm` voxels (z, y, x); returns the volume and its spacing."""
    size = [int(round(n * s / iso_mm)) for n, s in zip(hu.shape, spacing, strict=True)]
    with torch.no_grad():
        out = nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None],
                                        size=size, mode="trilinear", align_corners=True)[0, 0].numpy()
    factor = (np.asarray(size) - 1) / (np.asarray(hu.shape) - 1)
    return out, np.asarray(spacing, dtype=float) / factor


def lung_mask(hu: np.ndarray) -> np.ndarray:
    """The (up to 3) large air regions not touching the in-plane border, closed by a 6 mm ball (on a 2 mm grid)."""
    half = hu[::2, ::2, ::2] < -400
    lab, n = ndimage.label(half)
    border = np.unique(np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(), lab[:, :, 0].ravel(),
                                       lab[:, :, -1].ravel()]))
    sizes = ndimage.sum(half, lab, np.arange(1, n + 1))
    keep = np.zeros(n + 1, dtype=bool)
    for i in np.argsort(-sizes)[:3]:
        if i + 1 not in border and sizes[i] > 20000:
            keep[i + 1] = True
    lung = keep[lab]
    g = np.mgrid[-3:4, -3:4, -3:4]
    ball = (g ** 2).sum(0) <= 9
    closed = ndimage.binary_erosion(ndimage.binary_dilation(lung, ball), ball, border_value=1) | lung
    full = closed.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    return np.pad(full, [(0, a - b) for a, b in zip(hu.shape, full.shape, strict=True)])


def _log_response(img: np.ndarray) -> np.ndarray:
    """The largest scale-normalised LoG response (bright blobs positive) over `SIGMAS_MM`."""
    return reduce(np.maximum, (-(s ** 2) * ndimage.gaussian_laplace(img, s, truncate=3.0) for s in SIGMAS_MM))


def _peaks(best: np.ndarray, floor: float, where: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima (3x3x3) of a response above `floor` inside `where`: (indices [N, 3], responses [N])."""
    peaks = np.argwhere((best == ndimage.maximum_filter(best, size=3)) & (best > floor) & where)
    return peaks, best[tuple(peaks.T)]


def log_candidates(iso: np.ndarray, floor: float = LOG_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """Blob candidates on a 1 mm volume: (voxel indices [N, 3], LoG responses [N])."""
    img = np.clip(iso, -1000.0, 100.0)
    return _peaks(_log_response(img), floor, lung_mask(iso))


def wall_candidates(iso: np.ndarray, mask: np.ndarray, plain: np.ndarray, near_mm: float = 4.0,
                    floor: float = LOG_FLOOR, apart_mm: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Blob candidates against the chest wall that `log_candidates` misses: (indices [N, 3], responses [N]).

    Next to the wall the plain LoG response of a faint (ground-glass) nodule is cancelled by the wall edge's
    negative lobe. Here every voxel that is not lung air (denser than -300 HU or outside the mask), and the air
    voxels touching one (the wall's partial-volume rim), are set to -850 HU first; maxima within `near_mm` of the
    mask's edge and more than `apart_mm` from every `plain` candidate (indices) are kept: 43-910 per chest CT
    (mean 193 on seeds 9020-9059)."""
    air = ndimage.binary_erosion(mask & (iso < -300.0), border_value=0)
    img = np.where(air, np.clip(iso, -1000.0, 100.0), -850.0)
    peaks, response = _peaks(_log_response(img), floor, mask & (ndimage.distance_transform_edt(mask) <= near_mm))
    if len(plain) and len(peaks):
        from scipy.spatial import cKDTree

        far = cKDTree(np.asarray(plain, dtype=float)).query(peaks)[0] > apart_mm
        peaks, response = peaks[far], response[far]
    return peaks, response


def to_u8(hu: np.ndarray) -> np.ndarray:
    lo, hi = WINDOW
    return np.clip((hu - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def patches(u8: np.ndarray, idx: np.ndarray) -> np.ndarray:
    h = PATCH // 2
    pad = np.pad(u8, h, mode="constant", constant_values=0)
    out = np.empty((len(idx), PATCH, PATCH, PATCH), dtype=np.uint8)
    for i, (z, y, x) in enumerate(np.asarray(idx, dtype=int)):
        out[i] = pad[z:z + PATCH, y:y + PATCH, x:x + PATCH]
    return out


def _to_mm(idx: np.ndarray, t: np.ndarray, o: np.ndarray) -> np.ndarray:
    """Voxel indices (z, y, x) on a grid of spacing `t` and origin `o` (x, y, z) -> patient xyz mm."""
    idx = np.asarray(idx, dtype=float).reshape(-1, 3)
    return np.stack([o[0] + idx[:, 2] * t[2], o[1] + idx[:, 1] * t[1], o[2] + idx[:, 0] * t[0]], 1)


def _to_idx(mm: np.ndarray, t: np.ndarray, o: np.ndarray) -> np.ndarray:
    """Patient xyz mm -> fractional voxel indices (z, y, x) on a grid of spacing `t` and origin `o` (x, y, z)."""
    mm = np.asarray(mm, dtype=float).reshape(-1, 3)
    return np.stack([(mm[:, 2] - o[2]) / t[0], (mm[:, 1] - o[1]) / t[1], (mm[:, 0] - o[0]) / t[2]], 1)


def scan_candidates(hu: np.ndarray, spacing: Any, origin: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                                      np.ndarray]:
    """(1 mm uint8 volume, candidate indices, LoG responses, candidate xyz mm, 1 mm spacing)."""
    iso, sp = zoom_iso(hu, tuple(spacing))
    pk, sc = log_candidates(iso)
    return to_u8(iso), pk, sc, _to_mm(pk, sp, np.asarray(origin, dtype=float)), sp


def training_patches(seed: int, nodules: int = 8, n_neg: int = 700, rows: int = 512, slices: int | None = None,
                     hard: nn.Module | None = None, n_hard: int = 500) -> tuple[np.ndarray, np.ndarray, int]:
    """Labelled patches of one generated chest CT: (patches, labels 1/0, candidate count).

    With a classifier `hard`, `n_hard` of the `n_neg` negatives are those it scores highest (hard negatives)."""
    from training.synthetic.chest_ct import generate_chest_ct

    rng = np.random.default_rng(seed)
    sv = generate_chest_ct(seed, nodules=nodules, rows=rows, slices=slices)
    u8, pk, _, mm, sp = scan_candidates(sv.hu, sv.spacing, sv.origin)
    o = np.asarray(sv.origin, dtype=float)
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
        j = _to_idx(c, sp, o)[0]
        for _ in range(6):
            extra.append(np.round(j + rng.uniform(-0.5, 0.5, 3) * min(r, 2.0)).astype(int))
    pos = np.nonzero(lab == 1)[0]
    neg = np.nonzero(lab == 0)[0]
    if hard is not None and len(neg) > n_neg:
        top = neg[np.argsort(-score(hard, patches(u8, pk[neg])))[:n_hard]]
        rest = np.setdiff1d(neg, top)
        neg = np.concatenate([top, rng.choice(rest, n_neg - len(top), replace=False)])
    else:
        neg = rng.choice(neg, min(n_neg, len(neg)), replace=False)
    idx = np.concatenate([pk[pos], np.asarray(extra, dtype=int).reshape(-1, 3), pk[neg]])
    y = np.concatenate([np.ones(len(pos) + len(extra)), np.zeros(len(neg))]).astype(np.uint8)
    return patches(u8, idx), y, len(pk)


def _block(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Conv3d(i, o, 3, padding=1, bias=False), nn.BatchNorm3d(o), nn.ReLU(inplace=True))


class CandidateNet(nn.Module):
    """Nodule-or-not logit of a 28 mm patch at 1 mm."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(_block(1, 16), _block(16, 16), nn.MaxPool3d(2), _block(16, 32), _block(32, 32),
                               nn.MaxPool3d(2), _block(32, 64), _block(64, 64), nn.MaxPool3d(2), _block(64, 64),
                               nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)[:, 0]


def load_classifier(path: Path) -> CandidateNet:
    """A trained `CandidateNet` from its state dict."""
    net = CandidateNet().to(memory_format=torch.channels_last_3d)
    net.load_state_dict(torch.load(path, map_location="cpu"))
    return net


def _crop(x: np.ndarray, off: Any) -> np.ndarray:
    return x[:, off[0]:off[0] + CROP, off[1]:off[1] + CROP, off[2]:off[2] + CROP]


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random 28 mm crop (+-2 mm), flips, and a y/x swap (not z: slice thickness differs)."""
    x = _crop(x, rng.integers(0, PATCH - CROP + 1, 3))
    for ax in (1, 2, 3):
        if rng.uniform() < 0.5:
            x = np.flip(x, ax)
    if rng.uniform() < 0.5:
        x = np.swapaxes(x, 2, 3)
    return np.ascontiguousarray(x)


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.astype(np.float32) / 255.0)[:, None].contiguous(memory_format=torch.channels_last_3d)


def score(net: nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Classifier probabilities of stored patches (centre crop)."""
    net.eval()
    out = []
    c = (PATCH - CROP) // 2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(x), batch):
            out.append(torch.sigmoid(net(_tensor(_crop(x[i:i + batch], (c, c, c)))).float()).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def train_classifier(patch_dirs: list[Path], out: Path, minutes: float, lr: float = 2e-3, seed: int = 0,
                     init: Path | None = None, log: Callable[[str], None] = print) -> dict[str, float]:
    """Train `CandidateNet` for `minutes` (cosine lr over that time; 16 positives + 48 negatives a batch).

    The first 4 files (by name) of the first folder and the first 2 of each further one are validation; `init`
    starts from a trained classifier. Returns the last validation figures."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    def load(fs: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        d = [np.load(f) for f in fs]
        return np.concatenate([z["x"] for z in d]), np.concatenate([z["y"] for z in d])

    train_files, val_files = [], []
    for i, d in enumerate(patch_dirs):
        fs = sorted(d.glob("train_*.npz"))
        k = 4 if i == 0 else 2
        val_files += fs[:k]
        train_files += fs[k:]
    x, y = load(train_files)
    xv, yv = load(val_files)
    pos, neg = np.nonzero(y == 1)[0], np.nonzero(y == 0)[0]
    log(f"train positives {len(pos)} negatives {len(neg)}; validation {int(yv.sum())} / {int((1 - yv).sum())}")
    net = CandidateNet().to(memory_format=torch.channels_last_3d) if init is None else load_classifier(init)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    t0, total, step, figures = time.time(), minutes * 60.0, 0, {}
    while time.time() - t0 < total:
        net.train()
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * min(1.0, (time.time() - t0) / total)))
        bi = np.concatenate([rng.choice(pos, 16), rng.choice(neg, 48)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logit = net(_tensor(_augment(x[bi], rng)))
        loss = loss_fn(logit.float(), torch.from_numpy(y[bi].astype(np.float32)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            sv = score(net, xv)
            th = float(np.quantile(sv[yv == 1], 0.05))
            figures = {"step": step, "seconds": time.time() - t0, "loss": float(loss.item()),
                       "negatives_at_95pc_sensitivity": float(np.mean(sv[yv == 0] >= th))}
            log(json.dumps(figures))
            torch.save(net.state_dict(), out)
    torch.save(net.state_dict(), out)
    return {**figures, "steps": step}


def first_stage_maps(model_dir: Path, datalist: Path, split: str, out: Path) -> None:
    """The served lung model's probability maps (model grid, flips included) for each case of a split."""
    from inference.backends.onnxruntime_backend import OnnxRuntimeBackend
    from inference.model_card import ModelCard
    from inference.postprocess import sigmoid
    from training.cli import _infer_case
    from training.datasets import resolve

    out.mkdir(parents=True, exist_ok=True)
    fields = json.loads((model_dir / "metadata.json").read_text())
    card = ModelCard.model_validate({**fields, "version": "eval", "weights_sha256": "0" * 64})
    entries = [resolve(e, datalist.parent) for e in json.loads(datalist.read_text())[split]]
    backend = OnnxRuntimeBackend(model_dir / "1" / "model.onnx", fields["name"], providers=["CPUExecutionProvider"],
                                 intra_op_threads=2)
    try:
        for e in entries:
            f = out / f"{e['seed']}.npz"
            if not f.exists():
                _, image, info, logits = _infer_case(e, card, backend)
                np.savez(f, prob=sigmoid(logits[0]).astype(np.float16), image=np.asarray(image, dtype=np.float16),
                         target_spacing=info.target_spacing)
    finally:
        backend.close()


def split_candidates(datalist: Path, split: str, out: Path) -> None:
    """Blob candidates and their patches for each case of a split."""
    import nibabel as nib

    out.mkdir(parents=True, exist_ok=True)
    for e in json.loads(datalist.read_text())[split]:
        f = out / f"{e['seed']}.npz"
        if not f.exists():
            hu = np.asarray(nib.load(datalist.parent / e["image"]).dataobj, dtype=np.float32)
            u8, pk, sc, mm, _ = scan_candidates(hu, e["spacing"], e["origin"])
            np.savez(f, x=patches(u8, pk), mm=mm.astype(np.float32), score=sc.astype(np.float32))


def split_wall_candidates(datalist: Path, split: str, plain_dir: Path, out: Path) -> None:
    """`wall_candidates` and their patches for each case of a split whose plain candidates are in `plain_dir`."""
    import nibabel as nib

    out.mkdir(parents=True, exist_ok=True)
    for e in json.loads(datalist.read_text())[split]:
        f, fp = out / f"{e['seed']}.npz", plain_dir / f"{e['seed']}.npz"
        if f.exists() or not fp.exists():
            continue
        hu = np.asarray(nib.load(datalist.parent / e["image"]).dataobj, dtype=np.float32)
        iso, sp = zoom_iso(hu, tuple(e["spacing"]))
        o, mm = np.asarray(e["origin"], dtype=float), np.load(fp)["mm"].astype(float)
        pk, sc = wall_candidates(iso, lung_mask(iso), _to_idx(mm, sp, o))
        np.savez(f, x=patches(to_u8(iso), pk), mm=_to_mm(pk, sp, o).astype(np.float32), score=sc.astype(np.float32))


def first_stage_candidates(prob: np.ndarray, hu: np.ndarray, t: np.ndarray, o: np.ndarray, floor: float = 0.05
                           ) -> list[tuple[tuple[float, ...], float]]:
    """Components at p > floor, air/bone dropped (mean HU outside [-900, 200]), probability-weighted centre."""
    lab, n = ndimage.label(prob > floor, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return []
    ids = np.arange(1, n + 1)
    mx = np.asarray(ndimage.maximum(prob, lab, ids))
    mh = np.asarray(ndimage.mean(hu, lab, ids))
    keep = ids[(mh >= -900) & (mh <= 200)]
    c = np.asarray(ndimage.center_of_mass(prob, lab, keep)).reshape(-1, 3)
    return [(tuple(float(v) for v in p), float(mx[k - 1])) for p, k in zip(_to_mm(c, t, o), keep, strict=True)]


def _local_max(prob: np.ndarray, t: np.ndarray, o: np.ndarray, mm: np.ndarray) -> np.ndarray:
    j = np.clip(np.round(_to_idx(mm, t, o)).astype(int), 0, np.array(prob.shape) - 1)
    return ndimage.maximum_filter(prob, size=3)[tuple(j.T)]


# name -> (blob score from classifier probability "s" and first-stage local max "p", or None; keep first stage)
COMBINATIONS: dict[str, tuple[Callable[[dict[str, Any]], np.ndarray] | None, bool]] = {
    "first stage only": (None, True),
    "classifier only": (lambda r: r["s"], False),
    "union": (lambda r: r["s"], True),
    "union, classifier x p^0.25": (lambda r: r["s"] * np.maximum(r["p"], 1e-4) ** 0.25, True),
    "union, mean(classifier, p)": (lambda r: 0.5 * (r["s"] + r["p"]), True),
}


def scored_cases(classifier: Path, datalist: Path, split: str, maps: Path, cands: Path,
                 cache: Path | None = None, extra: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """Per case: first-stage candidates "A", blob positions "mm", classifier "s" and first-stage "p" at each blob.

    `extra` folders hold more blob candidates (e.g. `wall_candidates`), appended to those of `cands`. With
    `cache`, each case's figures are kept there (one .npz per seed; an extra folder's under its name) and read
    back on the next call."""
    net = load_classifier(classifier)
    rows = _scored_plain(net, datalist, split, maps, cands, cache)
    for d in extra:
        for r in rows:
            seed = r["e"]["seed"]
            fk = None if cache is None else cache / d.name / f"{seed}.npz"
            if fk is not None and fk.exists():
                z = np.load(fk)
                mm, sv, pv = z["mm"], z["s"], z["p"]
            else:
                zm, zc = np.load(maps / f"{seed}.npz"), np.load(d / f"{seed}.npz")
                mm = zc["mm"].astype(float)
                t, o = np.asarray(zm["target_spacing"], float), np.asarray(r["e"]["origin"], float)
                sv, pv = score(net, zc["x"]), _local_max(zm["prob"].astype(np.float32), t, o, mm)
                if fk is not None:
                    fk.parent.mkdir(parents=True, exist_ok=True)
                    np.savez(fk, mm=mm, s=sv, p=pv)
            r["mm"] = np.concatenate([r["mm"], mm.reshape(-1, 3)])
            r["s"], r["p"] = np.concatenate([r["s"], sv]), np.concatenate([r["p"], pv])
    return rows


def _scored_plain(net: nn.Module, datalist: Path, split: str, maps: Path, cands: Path,
                  cache: Path | None) -> list[dict[str, Any]]:
    rows = []
    for e in json.loads(datalist.read_text())[split]:
        fm, fc = maps / f"{e['seed']}.npz", cands / f"{e['seed']}.npz"
        fk = None if cache is None else cache / f"{e['seed']}.npz"
        if fk is not None and fk.exists():
            z = np.load(fk)
            rows.append({"e": e, "A": [(tuple(m), float(v)) for m, v in zip(z["a_mm"], z["a_p"], strict=True)],
                         "mm": z["mm"], "s": z["s"], "p": z["p"]})
            continue
        if not (fm.exists() and fc.exists()):
            continue
        zm, zc = np.load(fm), np.load(fc)
        prob = zm["prob"].astype(np.float32)
        hu = WINDOW[0] + zm["image"].astype(np.float32) * (WINDOW[1] - WINDOW[0])
        t, o, mm = np.asarray(zm["target_spacing"], float), np.asarray(e["origin"], float), zc["mm"].astype(float)
        r = {"e": e, "A": first_stage_candidates(prob, hu, t, o), "mm": mm, "s": score(net, zc["x"]),
             "p": _local_max(prob, t, o, mm)}
        rows.append(r)
        if fk is not None:
            fk.parent.mkdir(parents=True, exist_ok=True)
            np.savez(fk, a_mm=np.asarray([a for a, _ in r["A"]], dtype=float).reshape(-1, 3),
                     a_p=np.asarray([v for _, v in r["A"]], dtype=float), mm=mm, s=r["s"], p=r["p"])
    return rows


def evaluate(classifier: Path, datalist: Path, split: str, maps: Path, cands: Path,
             cache: Path | None = None, extra: tuple[Path, ...] = ()) -> dict[str, Any]:
    """FROC / CPM (training.metrics.froc) of each combination over the cases with maps and candidates."""
    from training.metrics.froc import froc_cpm

    rows = scored_cases(classifier, datalist, split, maps, cands, cache, extra)
    truths = [[(n["centre_mm"], n["diameter_mm"]) for n in r["e"]["nodules"]] for r in rows]
    out: dict[str, Any] = {"cases": len(rows), "nodules": sum(map(len, truths))}
    for name, (blob_score, with_first_stage) in COMBINATIONS.items():
        preds = []
        for r in rows:
            blobs = [] if blob_score is None else [(tuple(m), float(v))
                                                   for m, v in zip(r["mm"], blob_score(r), strict=True)]
            preds.append((r["A"] if with_first_stage else []) + blobs)
        res = froc_cpm(preds, truths)
        out[name] = {"sensitivity_at_1fp_per_scan": res.sensitivities[3], "cpm": res.cpm,
                     "froc": [round(v, 3) for v in res.sensitivities],
                     "recall_any_threshold": res.n_true_positives / max(res.n_nodules, 1)}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training.two_stage_probe", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("patches")
    p.add_argument("out", type=Path)
    p.add_argument("first", type=int)
    p.add_argument("stop", type=int)
    p.add_argument("--hard", type=Path, help="classifier whose highest-scored negatives are kept (hard negatives)")
    p = sub.add_parser("train")
    p.add_argument("patch_dir", type=Path, nargs="+")
    p.add_argument("classifier", type=Path)
    p.add_argument("--minutes", type=float, default=22.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--init", type=Path, help="a trained classifier to start from")
    p = sub.add_parser("maps")
    p.add_argument("model_dir", type=Path)
    p.add_argument("datalist", type=Path)
    p.add_argument("split")
    p.add_argument("out", type=Path)
    p = sub.add_parser("candidates")
    p.add_argument("datalist", type=Path)
    p.add_argument("split")
    p.add_argument("out", type=Path)
    p = sub.add_parser("wall-candidates")
    p.add_argument("datalist", type=Path)
    p.add_argument("split")
    p.add_argument("plain_dir", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("evaluate")
    p.add_argument("classifier", type=Path)
    p.add_argument("datalist", type=Path)
    p.add_argument("split")
    p.add_argument("maps", type=Path)
    p.add_argument("candidates", type=Path)
    p.add_argument("--cache", type=Path, help="folder keeping each case's scores, read back on the next call")
    p.add_argument("--extra", type=Path, action="append", default=[],
                   help="a folder of more blob candidates (wall-candidates) to add; may be repeated")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    if a.cmd == "patches":
        a.out.mkdir(parents=True, exist_ok=True)
        hard = None if a.hard is None else load_classifier(a.hard)
        for s in range(a.first, a.stop):
            f = a.out / f"train_{s}.npz"
            if not f.exists():
                x, y, n = training_patches(s, hard=hard)
                np.savez(f, x=x, y=y)
                print(s, "candidates", n, "positives", int(y.sum()), "negatives", int((1 - y).sum()), flush=True)
    elif a.cmd == "train":
        print(train_classifier(a.patch_dir, a.classifier, a.minutes, lr=a.lr, init=a.init,
                               log=lambda s: print(s, flush=True)))
    elif a.cmd == "maps":
        first_stage_maps(a.model_dir, a.datalist, a.split, a.out)
    elif a.cmd == "candidates":
        split_candidates(a.datalist, a.split, a.out)
    elif a.cmd == "wall-candidates":
        split_wall_candidates(a.datalist, a.split, a.plain_dir, a.out)
    else:
        print(json.dumps(evaluate(a.classifier, a.datalist, a.split, a.maps, a.candidates, a.cache,
                                  tuple(a.extra)), indent=1))


if __name__ == "__main__":
    main()
