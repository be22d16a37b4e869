"""Nodule insertion paints a labelled, noisy nodule into lung only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.nodule_insertion import RandInsertNoduled, patch_noise_hu

WINDOW = (-1000.0, 400.0)


def _patch(hu_value: float, seed: int = 0, sigma: float = 20.0) -> dict:
    rng = np.random.default_rng(seed)
    hu = np.full((1, 32, 40, 40), hu_value, np.float32) + rng.normal(0, sigma, (1, 32, 40, 40)).astype(np.float32)
    return {"image": (hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), "label": np.zeros_like(hu)}


def _hu(image) -> np.ndarray:  # noqa: ANN001
    return WINDOW[0] + np.asarray(image)[0] * (WINDOW[1] - WINDOW[0])


def test_inserts_a_labelled_nodule_in_lung() -> None:
    t = RandInsertNoduled(("image", "label"), WINDOW, (1.5, 1.5, 1.5), prob=1.0)
    t.set_random_state(3)
    data = _patch(-850.0)
    out = t(data)
    nodule = out["label"][0] > 0
    assert nodule.sum() >= 4
    hu = _hu(out["image"])
    assert hu[nodule].mean() > -750.0                      # denser than the -850 HU lung around it
    changed = np.abs(hu - _hu(data["image"])) > 1e-3
    assert np.all(changed[nodule])                         # every labelled voxel was painted
    # the painted nodule carries the patch's noise (solid interiors are not perfectly flat)
    core = nodule & (hu > -200)
    if core.sum() > 20:
        assert hu[core].std() > 5.0


def test_no_lung_no_nodule_and_prob_zero() -> None:
    tissue = _patch(40.0)
    t = RandInsertNoduled(("image", "label"), WINDOW, (1.5, 1.5, 1.5), prob=1.0)
    out = t(dict(tissue))
    assert out["label"].sum() == 0 and np.array_equal(out["image"], tissue["image"])
    lung = _patch(-850.0)
    off = RandInsertNoduled(("image", "label"), WINDOW, (1.5, 1.5, 1.5), prob=0.0)
    assert off(dict(lung))["label"].sum() == 0


def test_deterministic_and_keeps_tensor_type() -> None:
    outs = []
    for _ in range(2):
        t = RandInsertNoduled(("image", "label"), WINDOW, (1.5, 1.5, 1.5), prob=1.0)
        t.set_random_state(7)
        d = _patch(-850.0)
        outs.append(t({"image": torch.from_numpy(d["image"]), "label": torch.from_numpy(d["label"])}))
    assert isinstance(outs[0]["image"], torch.Tensor)
    assert torch.equal(outs[0]["image"], outs[1]["image"]) and torch.equal(outs[0]["label"], outs[1]["label"])


def test_patch_noise_estimate() -> None:
    hu = _hu(_patch(-850.0, sigma=20.0)["image"])
    assert 17.0 < patch_noise_hu(hu, np.ones_like(hu, bool)) < 23.0


def _equivalent_diameter_mm(label: np.ndarray, spacing: float = 1.5) -> float:
    return float((6.0 * label.sum() * spacing**3 / np.pi) ** (1.0 / 3.0))


def test_small_fraction_draws_small_nodules() -> None:
    sizes = []
    for seed in range(6):
        t = RandInsertNoduled(("image", "label"), WINDOW, (1.5, 1.5, 1.5), prob=1.0, small_fraction=1.0,
                              small_max_mm=5.0)
        t.set_random_state(seed)
        out = t(_patch(-850.0, seed=seed))
        sizes.append(_equivalent_diameter_mm(np.asarray(out["label"])[0] > 0))
    assert all(0 < s <= 5.0 * 1.3 for s in sizes), sizes   # lobulation adds at most ~ +20 % to the radius


def test_juxtapleural_fraction_puts_the_nodule_on_the_lung_edge() -> None:
    edge = 20                                   # lung for x < 20, chest wall (40 HU) beyond
    for seed in range(4):
        data = _patch(-850.0, seed=seed)
        hu = _hu(data["image"])
        hu[..., edge:] = 40.0
        data["image"] = ((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]))[None]
        t = RandInsertNoduled(("image", "label"), WINDOW, (1.5, 1.5, 1.5), prob=1.0, juxtapleural_fraction=1.0)
        t.set_random_state(seed)
        nodule = np.asarray(t(data)["label"])[0] > 0
        assert nodule.any()
        assert np.argwhere(nodule)[:, 2].max() >= edge - 1   # it reaches the pleura


def test_vessel_fraction_puts_the_nodule_against_a_vessel() -> None:
    """A 40 HU vessel along z through open lung: every nodule drawn with vessel_fraction 1 abuts it."""
    for seed in range(4):
        data = _patch(-850.0, seed=seed)
        hu = _hu(data["image"])
        yy, xx = np.mgrid[:40, :40]
        tube = (yy - 20) ** 2 + (xx - 20) ** 2 <= 4
        hu[:, tube] = 40.0
        data["image"] = ((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]))[None]
        t = RandInsertNoduled(("image", "label"), WINDOW, (1.5, 1.5, 1.5), prob=1.0, vessel_fraction=1.0,
                              small_fraction=1.0, small_max_mm=6.0)
        t.set_random_state(seed)
        nodule = np.asarray(t(data)["label"])[0] > 0
        assert nodule.any()
        gap_mm = 1.5 * np.sqrt(((np.argwhere(nodule)[:, 1:] - 20) ** 2).sum(1)).min() - 3.0   # tube radius 2 voxels
        assert gap_mm <= 1.5, gap_mm                       # within a voxel of the vessel wall


def test_kind_weights_are_checked() -> None:
    with pytest.raises(ValueError, match="kind_weights"):
        RandInsertNoduled(("image", "label"), WINDOW, (1.5, 1.5, 1.5), kind_weights=(1.0, 0.0))


def test_centre_within_mm_centres_the_nodule_on_the_patch() -> None:
    """A classifier patch is about its centre: with centre_within_mm 2 every nodule's centre of mass is there."""
    for seed in range(4):
        t = RandInsertNoduled(("image", "label"), WINDOW, (1.0, 1.0, 1.0), prob=1.0, small_fraction=1.0,
                              small_max_mm=8.0, centre_within_mm=2.0)
        t.set_random_state(seed)
        nodule = np.asarray(t(_patch(-850.0, seed=seed))["label"])[0] > 0
        assert nodule.any()
        offset = np.argwhere(nodule).mean(axis=0) - np.array([16, 20, 20])   # the centre voxel, index size // 2
        assert np.linalg.norm(offset) <= 2.0 + 1.0, offset                     # lobulation moves it < 1 mm
