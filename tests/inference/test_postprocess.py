"""Postprocessing on known probability maps: components, measurements in mm, label map convention."""

from __future__ import annotations

import numpy as np
import pytest

from inference.model_card import ModelCard
from inference.postprocess import (
    PostprocessError,
    cranio_caudal_subset,
    nodules,
    postprocess,
    sigmoid,
    softmax,
    vertebrae,
)
from inference.preprocess import preprocess
from inference.volume import Volume


def _volume(shape=(20, 30, 30), spacing=(2.0, 1.0, 1.0)) -> Volume:
    return Volume(
        voxels=np.zeros(shape, np.float32), spacing=spacing, origin=np.array([-15.0, -15.0, 50.0]),
        direction=np.eye(3), sop_instance_uids=[f"1.2.3.{k}" for k in range(shape[0])], modality="CT",
        frame_of_reference_uid="1.2.3.99",
    )


def _ball(shape, centre, radius, spacing) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    return sum((g - c * s) ** 2 for g, c, s in zip(grids, centre, spacing, strict=True)) <= radius**2


def _vertebra_card(nodule_card: ModelCard) -> ModelCard:
    data = nodule_card.model_dump()
    level = {"category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical structure"}}
    data.update(
        task="vertebra-labelling", postprocess="vertebrae",
        output={"name": "logits", "activation": "softmax", "channels": 3},
        labels=[{"index": 1, "name": "L1", "finding": {"value": "66794005", "scheme": "SCT",
                                                        "meaning": "First lumbar vertebra"}, **level},
                {"index": 2, "name": "L2", "finding": {"value": "14293000", "scheme": "SCT",
                                                        "meaning": "Second lumbar vertebra"}, **level}],
        thresholds={"probability": 0.5, "min_volume_mm3": 20.0},
    )
    return ModelCard.model_validate(data)


def test_activations():
    np.testing.assert_allclose(sigmoid(np.array([-100.0, 0.0, 100.0])), [0, 0.5, 1], atol=1e-6)
    p = softmax(np.random.default_rng(0).normal(size=(3, 4, 4, 4)) * 50)
    np.testing.assert_allclose(p.sum(axis=0), 1, atol=1e-5)


def test_nodules_two_components_measured_in_mm(nodule_model):
    vol = _volume()
    big = _ball(vol.shape, (10, 10, 10), 5.0, vol.spacing)
    small = _ball(vol.shape, (4, 22, 22), 2.5, vol.spacing)
    tiny = _ball(vol.shape, (16, 25, 5), 0.5, vol.spacing)  # one voxel: below min_diameter_mm 3
    prob = np.where(big, 0.9, 0.05) + np.where(small, 0.7, 0) + np.where(tiny, 0.8, 0)
    findings, label_map = nodules(prob.astype(np.float32), vol, nodule_model.card)

    assert [f.probability for f in findings] == pytest.approx([0.9, 0.75])
    first, second = findings
    assert first.centre_mm == pytest.approx((-5.0, -5.0, 70.0))  # origin + (x, y, z) index * spacing
    assert first.volume_mm3 == pytest.approx(big.sum() * 2.0)
    assert first.diameter_mm == pytest.approx((6 * first.volume_mm3 / np.pi) ** (1 / 3))
    assert 8.5 < first.diameter_mm < 11
    assert first.referenced_sop_instance_uid == "1.2.3.10" and second.referenced_sop_instance_uid == "1.2.3.4"
    assert first.tracking_uid != second.tracking_uid
    assert all(f.label_index == 1 and f.label == "Lung nodule" for f in findings)
    assert label_map.dtype == np.uint8 and label_map.shape == vol.shape
    np.testing.assert_array_equal(label_map, (big | small).astype(np.uint8))  # the tiny one is dropped


def test_nodules_from_the_model_grid_are_measured_on_the_source_grid(nodule_model):
    vol = _volume(shape=(20, 30, 30), spacing=(2.0, 1.5, 1.5))
    vol.voxels[...] = -900.0
    vol.voxels[_ball(vol.shape, (10, 15, 12), 6.0, vol.spacing)] = 100.0
    image, info = preprocess(vol, nodule_model.card)  # model grid is 2 mm isotropic
    logits = np.where(image > 0.5, 8.0, -8.0)[None].astype(np.float32)
    findings, label_map = postprocess(logits, vol, nodule_model.card, info)
    assert label_map.shape == vol.shape
    assert len(findings) == 1
    assert findings[0].centre_mm == pytest.approx(vol.index_to_patient(np.array([10, 15, 12])), abs=1.0)
    assert findings[0].volume_mm3 == pytest.approx(4 / 3 * np.pi * 6.0**3, rel=0.25)
    with pytest.raises(PostprocessError):
        postprocess(logits[0], vol, nodule_model.card, info)


def test_vertebrae_largest_component_per_label(nodule_model):
    card = _vertebra_card(nodule_model.card)
    vol = _volume()
    logits = np.zeros((3, *vol.shape), np.float32)
    logits[0] = 5.0
    logits[1, 2:8, 10:20, 10:20] = 10.0      # L1
    logits[1, 15:16, 2:4, 2:4] = 10.0        # a stray L1 voxel group: not the largest component
    logits[2, 10:16, 10:20, 10:20] = 10.0    # L2
    findings, label_map = postprocess(logits, vol, card)
    assert [f.label for f in findings] == ["L1", "L2"]
    assert [f.label_index for f in findings] == [1, 2]
    assert findings[0].finding_code.value == "66794005" and findings[0].diameter_mm is None
    assert findings[0].centre_mm == pytest.approx(vol.index_to_patient(np.array([4.5, 14.5, 14.5])))
    assert findings[0].volume_mm3 == pytest.approx(6 * 10 * 10 * 2.0)
    assert findings[1].probability == pytest.approx(float(softmax(np.array([5.0, 0, 10.0]))[2]), rel=1e-5)
    assert set(np.unique(label_map)) == {0, 1, 2}
    assert label_map[15, 2, 2] == 0  # the stray component was removed
    assert vertebrae(softmax(logits), vol, card)[1].shape == vol.shape


def test_vertebrae_needs_enough_channels(nodule_model):
    card = _vertebra_card(nodule_model.card)
    with pytest.raises(PostprocessError):
        vertebrae(np.zeros((2, 4, 4, 4), np.float32), _volume((4, 4, 4)), card)


def _three_level_card(nodule_card: ModelCard, ordered: bool) -> ModelCard:
    data = _vertebra_card(nodule_card).model_dump()
    level = {"category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical structure"}}
    data["labels"].append({"index": 3, "name": "L3", "finding": {"value": "36470004", "scheme": "SCT",
                                                                  "meaning": "Third lumbar vertebra"}, **level})
    data.update(output={"name": "logits", "activation": "softmax", "channels": 4}, ordered_levels=ordered)
    return ModelCard.model_validate(data)


def test_cranio_caudal_subset_keeps_the_heaviest_ordered_run():
    # cranial first: L1 L2 "L1" L3 -> the stray L1 below L2 contradicts the order and is lighter
    assert cranio_caudal_subset([1, 2, 1, 3], [5.0, 5.0, 1.0, 5.0]) == [0, 1, 3]
    # a heavy level out of order wins against two light ones: L3(9) above L1(2), L2(2)
    assert cranio_caudal_subset([3, 1, 2], [9.0, 2.0, 2.0]) == [0]
    assert cranio_caudal_subset([3, 1, 2], [3.0, 2.0, 2.0]) == [1, 2]
    assert cranio_caudal_subset([], []) == []
    with pytest.raises(PostprocessError):
        cranio_caudal_subset([1, 2], [1.0])


@pytest.mark.parametrize("ordered", [False, True])
def test_vertebrae_out_of_order_are_dropped(nodule_model, ordered):
    card = _three_level_card(nodule_model.card, ordered)
    vol = _volume((24, 30, 30))
    probs = np.zeros((4, *vol.shape), np.float32)
    probs[0] = 1.0
    # identity direction: a higher slice index is more cranial. L1 above L2 (right), and a small "L3" on top
    blocks = {1: (slice(12, 18), slice(10, 20), slice(10, 20)), 2: (slice(2, 8), slice(10, 20), slice(10, 20)),
              3: (slice(20, 22), slice(2, 5), slice(2, 5))}
    for k, box in blocks.items():
        p = np.full(4, 0.05, np.float32)
        p[k] = 0.85
        probs[(slice(None), *box)] = p[:, None, None, None]
    findings, label_map = vertebrae(probs, vol, card.model_copy(update={
        "thresholds": card.thresholds.model_copy(update={"min_volume_mm3": 0.0})}))
    labels = sorted(f.label for f in findings)
    if ordered:
        assert labels == ["L1", "L2"]
        assert label_map[21, 3, 3] == 0
    else:
        assert labels == ["L1", "L2", "L3"]
        assert label_map[21, 3, 3] == 3
    assert label_map[15, 15, 15] == 1 and label_map[4, 15, 15] == 2


@pytest.mark.parametrize("spacing", [(2.0, 1.0, 1.0), (1.25, 0.7, 0.7), (3.0, 2.0, 2.0)])
def test_nodule_components_equal_those_of_the_whole_interpolated_map(nodule_model, spacing):
    from scipy import ndimage

    from inference.postprocess import nodules
    from inference.preprocess import ResampleInfo, resampled_shape, to_source_grid

    vol = _volume((40, 50, 46), spacing)
    model_shape = resampled_shape(vol.shape, spacing, (2.0, 2.0, 2.0))
    info = ResampleInfo.of(vol, (2.0, 2.0, 2.0), model_shape)
    rng = np.random.default_rng(4)
    prob = ndimage.gaussian_filter(rng.random(model_shape).astype(np.float32), 1.2)
    prob = (prob - prob.min()) / (prob.max() - prob.min())          # many blobs of all sizes near 0.5
    card = nodule_model.card.model_copy(update={"thresholds": nodule_model.card.thresholds.model_copy(
        update={"probability": 0.6, "min_diameter_mm": 0.0, "min_volume_mm3": 0.0})})
    found, label_map = nodules(prob, vol, card, info)
    full = to_source_grid(prob, info, vol.shape, order=1)            # the reference: label the whole map
    comps, n = ndimage.label(full > 0.6, structure=np.ones((3, 3, 3), bool))
    assert n > 3 and len(found) == n
    np.testing.assert_array_equal(label_map > 0, comps > 0)
    ids = np.arange(1, n + 1)
    ref = sorted(zip(ndimage.maximum(full, comps, ids), np.bincount(comps.ravel())[1:], strict=True), reverse=True)
    got = [(f.probability, round(f.volume_mm3 / vol.voxel_volume_mm3)) for f in found]
    np.testing.assert_allclose([g[0] for g in got], [r[0] for r in ref], rtol=1e-6)
    assert sorted(g[1] for g in got) == sorted(int(r[1]) for r in ref)


def test_nodule_in_air_is_dropped_by_min_mean_hu(nodule_model):
    """A component averaging below thresholds.min_mean_hu is air (noise outside the body), not a nodule."""
    vol = _volume()
    vol.voxels[...] = -1000.0                       # air outside the body ...
    vol.voxels[:, :, 15:] = -850.0                  # ... and aerated lung
    lung_nodule = _ball(vol.shape, (10, 15, 22), 3.0, vol.spacing)
    vol.voxels[lung_nodule] = -600.0                # a ground-glass nodule
    in_air = _ball(vol.shape, (10, 15, 5), 3.0, vol.spacing)
    prob = (np.where(lung_nodule, 0.9, 0.0) + np.where(in_air, 0.95, 0.0)).astype(np.float32)

    kept, _ = nodules(prob, vol, nodule_model.card)
    assert len(kept) == 2                           # the fixture card sets no attenuation floor
    card = nodule_model.card.model_copy(update={
        "thresholds": nodule_model.card.thresholds.model_copy(update={"min_mean_hu": -900.0})})
    kept, label_map = nodules(prob, vol, card)
    assert [f.probability for f in kept] == pytest.approx([0.9])
    assert kept[0].centre_mm == pytest.approx(vol.index_to_patient(np.array([10, 15, 22])), abs=0.5)
    assert not label_map[in_air].any() and label_map[lung_nodule].all()
