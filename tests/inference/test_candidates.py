"""Blob candidates (inference.candidates): a small nodule against a vessel, and one on the pleura, are found."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from inference import candidates as cand


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
    mask = cand.lung_mask(vol)
    assert mask[36, 50, 50] and not mask[36, 1, 1], "the lung is in the mask, the air outside the body is not"
    found = cand.blob_candidates(vol, mask)
    peaks, response = found.index, found.response
    d = np.linalg.norm(peaks - nodule, axis=1)
    assert d.min() < 2.5, f"no candidate inside the 5 mm nodule (nearest {d.min():.1f} mm)"
    assert mask[tuple(peaks.T)].all()
    hit = response[d < 2.5].max()
    along = np.linalg.norm(peaks[:, 1:] - on_vessel[1:], axis=1) < 2.0
    far = np.abs(peaks[:, 0] - nodule[0]) > 10
    assert not (along & far).any() or hit > response[along & far].max(), "the nodule outranks the plain vessel"


def test_wall_candidates_find_a_ground_glass_nodule_on_the_pleura_that_the_plain_blobs_miss() -> None:
    vol, nodule = _wall_phantom()
    mask = cand.lung_mask(vol)
    plain = cand.blob_candidates(vol, mask)
    assert np.linalg.norm(plain.index - nodule, axis=1).min() > 3.0, "the wall edge hides it from the plain LoG"
    wall = cand.wall_candidates(vol, mask, plain)
    d = np.linalg.norm(wall.index - nodule, axis=1)
    assert d.min() < 1.7 and wall.response[d.argmin()] > cand.LOG_FLOOR
    assert len(wall) <= 5, f"the wall's partial-volume rim gives no candidates of its own ({len(wall)})"
    both = cand.chest_candidates(vol)
    assert len(both) == len(plain) + len(wall)
    assert np.all((both.diameter_mm > 3.0) & (both.diameter_mm < 10.0)), "diameters of the LoG scales (3.5-9.7 mm)"


def _wall_phantom() -> tuple[np.ndarray, np.ndarray]:
    """1 mm volume: a lung box whose wall is at x = 15, a 3.4 mm ground-glass nodule sitting on it."""
    vol = np.full((72, 100, 100), 40.0, dtype=np.float32)
    vol[:, :4], vol[:, -4:], vol[:, :, :4], vol[:, :, -4:] = -1000.0, -1000.0, -1000.0, -1000.0
    vol[6:66, 15:85, 15:85] = -850.0
    z, y, x = np.mgrid[: vol.shape[0], : vol.shape[1], : vol.shape[2]]
    nodule = np.array([36.0, 50.0, 16.0])
    ball = (z - nodule[0]) ** 2 + (y - nodule[1]) ** 2 + (x - nodule[2]) ** 2 <= 1.7 ** 2
    vol[ball & (vol < -500)] = -600.0
    vol = ndimage.gaussian_filter(vol, 0.8)               # partial volume, as thick slices give
    vol += np.random.default_rng(0).normal(0.0, 15.0, vol.shape).astype(np.float32)
    return vol, nodule


def test_candidates_on_the_lung_box_equal_those_on_the_whole_volume() -> None:
    vessel = _phantom()[0]
    z, y, x = np.mgrid[: vessel.shape[0], : vessel.shape[1], : vessel.shape[2]]
    vessel[(z - 30) ** 2 + (y - 60) ** 2 + (x - 17) ** 2 <= 2.5 ** 2] = 40.0   # a solid nodule on the wall, x = 15
    for phantom in (vessel, _wall_phantom()[0]):
        vol = np.pad(phantom, ((3, 30), (25, 4), (10, 40)), constant_values=40.0)   # more body, off-centre
        mask = cand.lung_mask(vol)
        box = cand.lung_box(mask)
        assert all(b.stop - b.start < n for b, n in zip(box, vol.shape, strict=True)), "the box is smaller"
        plain = cand.blob_candidates(vol, mask)
        whole = plain + cand.wall_candidates(vol, mask, plain)
        boxed = cand.chest_candidates(vol)
        order = np.lexsort(whole.index.T[::-1]), np.lexsort(boxed.index.T[::-1])
        np.testing.assert_array_equal(whole.index[order[0]], boxed.index[order[1]])
        np.testing.assert_array_equal(whole.response[order[0]], boxed.response[order[1]])
        np.testing.assert_array_equal(whole.sigma_mm[order[0]], boxed.sigma_mm[order[1]])
        img = np.clip(vol, -1000.0, 100.0)   # every response the maxima inside the lungs read is the same
        near = ndimage.binary_dilation(mask, np.ones((3, 3, 3), dtype=bool))
        for full, part in zip(cand._log_response(img), cand._log_response(img[box]), strict=True):
            np.testing.assert_array_equal(full[box][near[box]], part[near[box]])
    assert cand.lung_box(np.zeros((8, 9, 10), dtype=bool)) == (slice(0, 8), slice(0, 9), slice(0, 10))


def test_candidates_on_several_threads_equal_those_on_one() -> None:
    vol = np.pad(_wall_phantom()[0], ((3, 30), (25, 4), (10, 40)), constant_values=40.0)
    one = cand.chest_candidates(vol)
    for threads in (2, 3, 4, 8):   # 3: the last group of scales is short; 8: more threads than scales
        many = cand.chest_candidates(vol, threads=threads)
        np.testing.assert_array_equal(many.index, one.index)
        np.testing.assert_array_equal(many.response, one.response)
        np.testing.assert_array_equal(many.sigma_mm, one.sigma_mm)
    img = np.clip(vol, -1000.0, 100.0)
    for serial, threaded in zip(cand._log_response(img), cand._log_response(img, threads=3), strict=True):
        np.testing.assert_array_equal(serial, threaded)


def test_patches_are_centred_on_their_index_and_zero_outside_the_volume() -> None:
    u8 = np.zeros((40, 40, 40), dtype=np.uint8)
    u8[20, 21, 22] = 255
    p = cand.patches(u8, np.array([[20, 21, 22], [0, 0, 0]]), 28)
    assert p.shape == (2, 28, 28, 28) and p[0, 14, 14, 14] == 255 and p[0].sum() == 255
    assert p[1, :14].sum() == 0 and p[1, :, :14].sum() == 0, "outside the volume is 0"


def test_resampling_to_1mm_keeps_the_first_voxel_and_the_extent() -> None:
    hu = np.arange(10 * 8 * 8, dtype=np.float32).reshape(10, 8, 8)
    iso = cand.to_iso(hu, (2.0, 0.5, 0.5))
    assert iso.shape == (20, 4, 4) and iso[0, 0, 0] == hu[0, 0, 0]
    assert np.isclose(iso[2, 2, 2], hu[1, 4, 4])

