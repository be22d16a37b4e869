"""Second-stage findings: a scored blob inside a first-stage finding is not reported twice; others are painted."""

from __future__ import annotations

import numpy as np
import pytest

from inference.findings import Code, Finding
from inference.model_card import ModelCard
from inference.second_stage import ScoredCandidates, add_candidate_findings, group_centre
from inference.volume import Volume


def _card(probability: float = 0.6) -> ModelCard:
    label = {"index": 1, "name": "Lung nodule", "finding": {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"},
             "category": {"value": "49755003", "scheme": "SCT", "meaning": "Morphologically abnormal structure"}}
    return ModelCard.model_validate({
        "name": "second", "version": "1", "task": "lung-nodule-candidate-classification", "description": "test",
        "modality": ["CT"], "body_part": ["CHEST"], "postprocess": "candidates",
        "input": {"spacing_mm": [1, 1, 1], "window": [-1000, 400], "roi_size": [28, 28, 28], "batch_size": 8},
        "output": {"channels": 1}, "labels": [label], "thresholds": {"probability": probability},
        "series": {"modalities": ["CT"]},
        "weights_sha256": "0" * 64})


def _volume() -> Volume:
    return Volume(voxels=np.zeros((40, 64, 64), dtype=np.int16), spacing=(2.0, 0.5, 0.5),
                  origin=np.array([-16.0, -16.0, 0.0]), direction=np.eye(3),
                  sop_instance_uids=[f"2.25.{i + 1}" for i in range(40)], modality="CT",
                  frame_of_reference_uid="2.25.1")


def test_blobs_below_threshold_inside_a_finding_or_beside_a_kept_blob_are_dropped() -> None:
    vol, card = _volume(), _card()
    first = Finding(label_index=1, label="Lung nodule", finding_code=Code("27925004", "SCT", "Nodule"),
                    centre_mm=tuple(float(v) for v in vol.index_to_patient(np.array([10.0, 20.0, 20.0]))),
                    probability=0.9, diameter_mm=6.0)
    scored = ScoredCandidates(
        source_index=np.array([[10.0, 22.0, 20.0],    # 1 mm from the first-stage finding: the same nodule
                               [30.0, 40.0, 40.0],    # a new one, kept
                               [30.0, 44.0, 40.0],    # 2 mm from it, less probable: the same blob
                               [20.0, 50.0, 10.0]]),  # below the threshold
        probability=np.array([0.95, 0.8, 0.7, 0.5], dtype=np.float32), diameter_mm=np.array([5.0, 4.0, 4.0, 9.0]))
    label_map = np.zeros(vol.shape, dtype=np.uint8)
    out = add_candidate_findings(scored, vol, card, [first], label_map)
    assert len(out) == 1 and out[0].probability == pytest.approx(0.8)
    # reported between the kept blob and the one it absorbed, weighted by their odds (4 and 7/3); the blob inside
    # the first-stage finding pulls it nowhere
    centre = np.array([30.0, 40.0 + 4.0 * (7 / 3) / (4 + 7 / 3), 40.0])
    assert np.allclose(out[0].centre_mm, vol.index_to_patient(centre), atol=1e-5)
    assert out[0].diameter_mm == pytest.approx(4.0) and out[0].referenced_sop_instance_uid == "2.25.31"
    painted = np.argwhere(label_map == 1)
    assert len(painted) > 0 and np.all(np.abs(painted - centre) <= [1, 4, 4])
    # a 4 mm sphere at 2 x 0.5 x 0.5 mm voxels: about 33.5 mm3 / 0.5 mm3 per voxel
    assert 40 <= len(painted) <= 90


def test_a_kept_blob_suppresses_less_probable_ones_within_its_radius_plus_4_mm() -> None:
    """Blobs on the rim of a large ground-glass nodule are the same nodule as the blob at its centre."""
    vol, card = _volume(), _card()
    scored = ScoredCandidates(
        source_index=np.array([[10.0, 30.0, 30.0],    # a 9 mm blob, kept
                               [10.0, 44.0, 30.0],    # 7 mm from it: inside 4.5 + 4 mm, the same nodule
                               [10.0, 30.0, 48.0]]),  # 9 mm from it: a nodule of its own
        probability=np.array([0.9, 0.8, 0.7], dtype=np.float32), diameter_mm=np.array([9.0, 4.0, 4.0]))
    out = add_candidate_findings(scored, vol, card, [], np.zeros(vol.shape, dtype=np.uint8))
    assert [f.probability for f in out] == pytest.approx([0.9, 0.7])
    smaller = ScoredCandidates(scored.source_index, scored.probability, np.array([4.0, 4.0, 4.0]))
    out = add_candidate_findings(smaller, vol, card, [], np.zeros(vol.shape, dtype=np.uint8))
    assert len(out) == 3                                # a 4 mm blob keeps only 2 + 4 mm around it


def test_a_candidate_classifier_runs_only_as_a_stage_and_declares_none() -> None:
    fields = _card().model_dump()
    assert not _card().runs_alone
    with pytest.raises(ValueError, match="declares no stages"):
        ModelCard.model_validate({**fields, "stages": [{"kind": "segmentation"}]})


def _weighted_sum_classifier(path, weights: np.ndarray) -> None:
    """An ONNX classifier whose logit is sum(patch * weights): no symmetry, so every mirror scores differently."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["image", "w"], ["p"]),
         helper.make_node("ReduceSum", ["p", "axes"], ["logits"], keepdims=1)],
        "weighted_sum", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 1, 24, 24, 24])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 1, 1, 1, 1])],
        [numpy_helper.from_array(weights[None, None].astype(np.float32), "w"),
         numpy_helper.from_array(np.array([2, 3, 4], dtype=np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_flipped_passes_rescore_only_candidates_at_or_above_the_screen(tmp_path) -> None:
    """`input.flips` with `flip_screen`: a candidate scoring >= the screen on its plain patch gets the mean
    probability of the plain and the mirrored patches (computed here with numpy); the others keep the plain score."""
    from inference.backends.onnxruntime_backend import OnnxRuntimeBackend
    from inference.candidates import ISO_MM, chest_candidates, patches, to_iso, to_u8
    from inference.second_stage import score_candidates
    from training.synthetic.chest_ct import generate_chest_ct

    weights = np.random.default_rng(5).normal(0.0, 0.05, (24, 24, 24))
    weights -= weights.mean()                       # logits spread around 0: plain scores either side of 0.5
    _weighted_sum_classifier(tmp_path / "c.onnx", weights)
    backend = OnnxRuntimeBackend(tmp_path / "c.onnx", "c", providers=["CPUExecutionProvider"], intra_op_threads=1)
    sv = generate_chest_ct(11, slices=60, nodules=3, rows=128)
    vol = Volume(voxels=sv.hu, spacing=tuple(sv.spacing), origin=np.asarray(sv.origin, dtype=float),
                 direction=np.eye(3), sop_instance_uids=[f"2.25.{i + 1}" for i in range(sv.hu.shape[0])],
                 modality="CT", frame_of_reference_uid="2.25.1")
    base = _card().model_dump()
    base["input"] = {**base["input"], "roi_size": (24, 24, 24)}
    plain = score_candidates(vol, backend, ModelCard.model_validate(base))
    flipped_card = ModelCard.model_validate(
        {**base, "input": {**base["input"], "flips": [[0], [1], [2]], "flip_screen": 0.5}})
    flipped = score_candidates(vol, backend, flipped_card)

    iso = to_iso(vol.voxels, vol.spacing)
    index = chest_candidates(iso).index
    x = patches(to_u8(iso), index, 24).astype(np.float64) / 255.0
    np.testing.assert_allclose(index * (ISO_MM / np.asarray(vol.spacing)), flipped.source_index)
    mirrored = [1 / (1 + np.exp(-np.einsum("nzyx,zyx->n", np.flip(x, axes), weights)))
                for axes in ((), (1,), (2,), (3,))]
    np.testing.assert_allclose(plain.probability, mirrored[0], atol=1e-5)
    screened = plain.probability >= 0.5
    assert 0 < screened.sum() < len(screened), "candidates on both sides of the screen"
    np.testing.assert_allclose(flipped.probability[~screened], plain.probability[~screened])
    np.testing.assert_allclose(flipped.probability[screened], np.mean(mirrored, axis=0)[screened], atol=1e-5)
    assert np.max(np.abs(flipped.probability - plain.probability)) > 0.01, "mirroring changes the scores"


def test_a_group_is_reported_at_its_odds_weighted_centre() -> None:
    """Two near-certain blobs on one nodule share the mark; a less certain one beside it barely moves it."""
    points = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 2.6], [0.0, 4.3, 0.0]])
    both = group_centre(points, np.array([0.9986, 0.9993, 0.0]), [1, 0])     # odds 713 and 1427
    np.testing.assert_allclose(both, [0.0, 0.0, 2.6 * 1427 / (1427 + 713)], atol=0.01)
    beside = group_centre(points, np.array([0.9991, 0.0, 0.9503]), [0, 2])   # odds 1110 and 19
    assert np.linalg.norm(beside) < 0.1, "the vessel-side blob does not pull the mark off a 4 mm nodule"
    assert np.linalg.norm(group_centre(points, np.array([1.0, 1.0, 1.0]), [0, 1])) > 0.5, "p = 1 does not divide by 0"
