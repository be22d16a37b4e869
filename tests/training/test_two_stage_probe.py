"""The second-stage probe: blob candidates find a small nodule against a vessel, patches are labelled by nodule."""

from __future__ import annotations

import numpy as np
import torch

from training import two_stage_probe as probe


def _phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1 mm volume: soft tissue, an air box (lung) holding a vessel along z and a 5 mm nodule touching it."""
    vol = np.full((72, 100, 100), 40.0, dtype=np.float32)
    vol[:, :4], vol[:, -4:], vol[:, :, :4], vol[:, :, -4:] = -1000.0, -1000.0, -1000.0, -1000.0  # air outside
    vol[6:66, 15:85, 15:85] = -850.0
    z, y, x = np.mgrid[: vol.shape[0], : vol.shape[1], : vol.shape[2]]
    vessel = (y - 50) ** 2 + (x - 40) ** 2 <= 2.0 ** 2
    vol[vessel & (vol == -850.0)] = 40.0
    nodule = np.array([36.0, 50.0, 44.5])
    vol[(z - nodule[0]) ** 2 + (y - nodule[1]) ** 2 + (x - nodule[2]) ** 2 <= 2.5 ** 2] = 40.0
    vol += np.random.default_rng(0).normal(0.0, 15.0, vol.shape).astype(np.float32)
    return vol, nodule, np.array([36.0, 50.0, 40.0])


def test_blob_candidates_find_a_nodule_against_a_vessel_inside_the_lung_only() -> None:
    vol, nodule, on_vessel = _phantom()
    mask = probe.lung_mask(vol)
    assert mask[36, 50, 50] and not mask[36, 1, 1], "the lung is in the mask, the air outside the body is not"
    peaks, response = probe.log_candidates(vol)
    d = np.linalg.norm(peaks - nodule, axis=1)
    assert d.min() < 2.5, f"no candidate inside the 5 mm nodule (nearest {d.min():.1f} mm)"
    assert mask[tuple(peaks.T)].all()
    hit = response[d < 2.5].max()
    along = np.linalg.norm(peaks[:, 1:] - on_vessel[1:], axis=1) < 2.0
    far = np.abs(peaks[:, 0] - nodule[0]) > 10
    assert not (along & far).any() or hit > response[along & far].max(), "the nodule outranks the plain vessel"


def test_training_patches_label_candidates_by_nodule() -> None:
    from training.synthetic.chest_ct import generate_chest_ct

    small = [n for n in generate_chest_ct(7, nodules=3, rows=256, slices=80).nodules
             if n.diameter_mm <= probe.MAX_DIAMETER_MM]
    assert small, "seed 7 has a nodule the classifier is trained on"
    x, y, n = probe.training_patches(7, nodules=3, n_neg=50, rows=256, slices=80)
    assert x.shape[1:] == (probe.PATCH,) * 3 and x.dtype == np.uint8
    assert int((y == 0).sum()) == 50 and n >= 50
    # six jittered centres per nodule up to 12 mm, plus the blob candidates inside each of them
    assert int(y.sum()) >= 6 * len(small) + 1
    c = probe.PATCH // 2
    lung = probe.to_u8(np.array([-850.0]))[0]
    core = x[y == 1][:, c - 1:c + 2, c - 1:c + 2, c - 1:c + 2].mean(axis=(1, 2, 3))
    assert np.all(core > lung + 20), "every positive patch is centred on a nodule, denser than the lung"


def test_classifier_scores_every_patch_as_a_probability() -> None:
    net = probe.CandidateNet().to(memory_format=torch.channels_last_3d)
    p = probe.score(net, np.random.default_rng(0).integers(0, 255, (5, probe.PATCH, probe.PATCH, probe.PATCH),
                                                             dtype=np.uint8))
    assert p.shape == (5,) and np.all((p >= 0) & (p <= 1))
