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


class _Density(torch.nn.Module):
    """A stand-in scorer for hard-negative mining: the denser the patch centre, the higher the logit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1] // 2
        return 50.0 * (x[:, 0, c - 2:c + 2, c - 2:c + 2, c - 2:c + 2].mean(dim=(1, 2, 3)) - 0.1)


def test_hard_negatives_are_the_ones_the_classifier_scores_highest() -> None:
    kw = {"nodules": 3, "n_neg": 40, "rows": 256, "slices": 80}
    x0, y0, _ = probe.training_patches(7, **kw)
    x1, y1, _ = probe.training_patches(7, hard=_Density(), n_hard=30, **kw)
    assert int((y1 == 0).sum()) == 40 and int(y1.sum()) == int(y0.sum()), "same positives, same negative count"
    c = probe.PATCH // 2

    def density(x: np.ndarray) -> np.ndarray:
        return x[:, c - 2:c + 2, c - 2:c + 2, c - 2:c + 2].mean(axis=(1, 2, 3))

    d0, d1 = density(x0[y0 == 0]), density(x1[y1 == 0])
    assert np.sort(d1)[-30:].min() >= np.median(d0), "the mined negatives outrank a random draw's median"
    assert np.sort(d1)[-30:].mean() > np.sort(d0)[-30:].mean(), "and the random draw's top 30"


def test_wall_candidates_find_a_ground_glass_nodule_on_the_pleura_that_the_plain_blobs_miss() -> None:
    from scipy import ndimage

    vol = np.full((72, 100, 100), 40.0, dtype=np.float32)
    vol[:, :4], vol[:, -4:], vol[:, :, :4], vol[:, :, -4:] = -1000.0, -1000.0, -1000.0, -1000.0
    vol[6:66, 15:85, 15:85] = -850.0                      # the lung; its wall at x = 15
    z, y, x = np.mgrid[: vol.shape[0], : vol.shape[1], : vol.shape[2]]
    nodule = np.array([36.0, 50.0, 16.0])                 # a 3.4 mm ground-glass nodule sitting on the wall
    ball = (z - nodule[0]) ** 2 + (y - nodule[1]) ** 2 + (x - nodule[2]) ** 2 <= 1.7 ** 2
    vol[ball & (vol < -500)] = -600.0
    vol = ndimage.gaussian_filter(vol, 0.8)               # partial volume, as thick slices give
    vol += np.random.default_rng(0).normal(0.0, 15.0, vol.shape).astype(np.float32)
    plain, _ = probe.log_candidates(vol)
    assert np.linalg.norm(plain - nodule, axis=1).min() > 3.0, "the wall edge hides it from the plain LoG"
    wall, response = probe.wall_candidates(vol, probe.lung_mask(vol), plain)
    d = np.linalg.norm(wall - nodule, axis=1)
    assert d.min() < 1.7 and response[d.argmin()] > probe.LOG_FLOOR
    assert len(wall) <= 5, f"the wall's partial-volume rim gives no candidates of its own ({len(wall)})"
