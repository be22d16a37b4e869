"""The second stage's classifier data: patches are labelled by nodule, hard negatives outrank a random draw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from inference.candidates import to_u8
from training import candidate_classifier as cc


def test_training_patches_label_candidates_by_nodule() -> None:
    from training.synthetic.chest_ct import generate_chest_ct

    small = [n for n in generate_chest_ct(7, nodules=3, rows=256, slices=80).nodules
             if n.diameter_mm <= cc.MAX_DIAMETER_MM]
    assert small, "seed 7 has a nodule the classifier is trained on"
    x, y, n = cc.training_patches(7, nodules=3, n_neg=50, rows=256, slices=80)
    assert x.shape[1:] == (cc.STORED,) * 3 and x.dtype == np.uint8
    assert int((y == 0).sum()) == 50 and n >= 50
    # six jittered centres per nodule up to 12 mm, plus the blob candidates inside each of them
    assert int(y.sum()) >= 6 * len(small) + 1
    c = cc.STORED // 2
    lung = to_u8(np.array([-850.0]))[0]
    core = x[y == 1][:, c - 1:c + 2, c - 1:c + 2, c - 1:c + 2].mean(axis=(1, 2, 3))
    assert np.all(core > lung + 20), "every positive patch is centred on a nodule, denser than the lung"


def test_classifier_scores_every_patch_as_a_probability() -> None:
    net = cc.CandidateNet()
    p = cc.score(net, np.random.default_rng(0).integers(0, 255, (5, cc.STORED, cc.STORED, cc.STORED),
                                                             dtype=np.uint8))
    assert p.shape == (5,) and np.all((p >= 0) & (p <= 1))


class _Density(torch.nn.Module):
    """A stand-in scorer for hard-negative mining: the denser the patch centre, the higher the logit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1] // 2
        return 50.0 * (x[:, :, c - 2:c + 2, c - 2:c + 2, c - 2:c + 2].mean(dim=(2, 3, 4), keepdim=True) - 0.1)


def test_hard_negatives_are_the_ones_the_classifier_scores_highest() -> None:
    kw = {"nodules": 3, "n_neg": 40, "rows": 256, "slices": 80}
    x0, y0, _ = cc.training_patches(7, **kw)
    x1, y1, _ = cc.training_patches(7, hard=_Density(), n_hard=30, **kw)
    assert int((y1 == 0).sum()) == 40 and int(y1.sum()) == int(y0.sum()), "same positives, same negative count"
    c = cc.STORED // 2

    def density(x: np.ndarray) -> np.ndarray:
        return x[:, c - 2:c + 2, c - 2:c + 2, c - 2:c + 2].mean(axis=(1, 2, 3))

    d0, d1 = density(x0[y0 == 0]), density(x1[y1 == 0])
    assert np.sort(d1)[-30:].min() >= np.median(d0), "the mined negatives outrank a random draw's median"
    assert np.sort(d1)[-30:].mean() > np.sort(d0)[-30:].mean(), "and the random draw's top 30"


def test_painted_nodules_turn_lung_negatives_into_positives() -> None:
    """`paint_nodules` makes at most `want` negatives positive, each with a nodule at its centre; patches with no
    lung near the centre (soft tissue) stay negatives, and positives are never touched."""
    rng = np.random.default_rng(0)
    hu = np.where(np.arange(8)[:, None, None, None] < 6, -850.0, 40.0) + rng.normal(0, 15, (8, 24, 24, 24))
    yy, xx = np.mgrid[:24, :24]
    hu[:6, :, (yy - 12) ** 2 + (xx - 15) ** 2 <= 2] = 40.0       # a vessel along z, 3 mm from the centre
    x = to_u8(hu)
    y = np.array([1, 0, 0, 0, 0, 0, 0, 0], dtype=np.uint8)
    before = x.copy()
    painter = cc.nodule_painter(0)
    assert cc.paint_nodules(x, y, painter, want=2) == 2
    assert y[0] == 1 and y.sum() == 3 and y[6:].sum() == 0
    changed = np.any(x != before, axis=(1, 2, 3))
    assert np.array_equal(changed, (y == 1) & (np.arange(8) > 0)), "exactly the new positives were painted"
    c = 12
    gain = (x.astype(float) - before)[changed][:, c - 2:c + 3, c - 2:c + 3, c - 2:c + 3].max(axis=(1, 2, 3))
    assert np.all(gain > 30), "each painted nodule makes the patch centre denser (>= ground glass over lung)"
    y2 = np.array([0, 0], dtype=np.uint8)
    assert cc.paint_nodules(x[6:8].copy(), y2, painter, want=2) == 0 and y2.sum() == 0, "no lung, no nodule"


def _patch_folder(folder: Path, seed: int, files: int = 3, n: int = 40) -> Path:
    """`files` patch files of lung-like noise, positives with a dense ball at the centre."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:cc.STORED, :cc.STORED, :cc.STORED] - cc.STORED // 2
    ball = zz ** 2 + yy ** 2 + xx ** 2 <= 9
    for f in range(files):
        y = (np.arange(n) % 4 == 0).astype(np.uint8)
        hu = -850.0 + rng.normal(0, 20, (n, cc.STORED, cc.STORED, cc.STORED))
        hu[y == 1] += np.where(ball, 850.0, 0.0)
        np.savez(folder / f"train_{seed + f}.npz", x=to_u8(hu), y=y, candidates=n)
    return folder


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu")


def test_a_step_budget_round_resumed_after_an_interruption_ends_with_the_same_weights(tmp_path: Path) -> None:
    """Same seed, same steps: the same weights; killed after step 6 (last checkpoint at 3) and run again, the round
    resumes at 3 and ends exactly where the uninterrupted one did, with one CSV row per step."""
    import csv

    import pytest

    data = [_patch_folder(tmp_path / "p1", 100), _patch_folder(tmp_path / "p2", 200)]
    kw = {"steps": 9, "lr": 0.002, "seed": 0, "painted": 2, "validate_every": 3, "log": lambda s: None}
    whole = cc.train_classifier(data, tmp_path / "whole.pt", **kw)
    again = cc.train_classifier(data, tmp_path / "again.pt", **kw)
    assert whole["steps"] == again["steps"] == 9 and whole["painted"] >= 1

    def stop_at_step_6(line: str) -> None:
        if '"step": 6' in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cc.train_classifier(data, tmp_path / "cut.pt", **{**kw, "log": stop_at_step_6})
    assert torch.load(tmp_path / "cut.last.pt", weights_only=False)["step"] == 3
    said: list[str] = []
    resumed = cc.train_classifier(data, tmp_path / "cut.pt", **{**kw, "log": said.append})
    assert "resuming cut.pt at step 3" in said
    assert resumed["steps"] == 9 and resumed["painted"] == whole["painted"]
    w, a, r = (_weights(tmp_path / f"{n}.pt") for n in ("whole", "again", "cut"))
    assert all(torch.equal(w[k], a[k]) for k in w), "the same seed and steps give the same weights"
    assert all(torch.equal(w[k], r[k]) for k in w), "the resumed round ends with the uninterrupted one's weights"
    with (tmp_path / "cut.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 10))
    assert [r["negatives_at_95pc_sensitivity"] != "" for r in rows] == [(s % 3 == 0) for s in range(1, 10)]
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(0.002) and all(lrs[i + 1] < lrs[i] for i in range(8)), "cosine over the steps"


def test_a_round_needs_exactly_one_budget(tmp_path: Path) -> None:
    import pytest

    from training.second_stage import SecondStageConfig

    base = {"run_dir": str(tmp_path), "calibration": {"dir": str(tmp_path), "section": "c", "n": 1, "seed": 1}}
    for budget in ({}, {"steps": 10, "minutes": 1.0}):
        with pytest.raises(ValueError, match="round 1: give either steps or minutes"):
            SecondStageConfig.model_validate({**base, "rounds": [{"seeds": [1, 2], "lr": 0.001, **budget}]})
    with pytest.raises(ValueError, match="give a round either steps or minutes"):
        cc.train_classifier([tmp_path], tmp_path / "x.pt", lr=0.001)
