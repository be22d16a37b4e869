"""Benchmark metrics against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from training.metrics import aggregate_id_rates, aggregate_keypoints, froc_cpm, identification_rate, keypoint_hits
from training.metrics.froc import match_scan
from training.metrics.keypoints import pixel_distance_mm


def test_froc_luna16_rules_hand_computed():
    # scan A: N1 (d 10) hit twice (0.9 kept, 0.5 double), N2 (d 6) hit at 2.9 mm by 0.3, one FP 0.8
    # scan B: N3 missed; FP 0.7; 0.6 lies on an irrelevant finding -> ignored
    preds = [[((1, 1, 1), 0.9), ((2, 0, 0), 0.5), ((100, 0, 0), 0.8), ((52.9, 0, 0), 0.3)],
             [((10, 10, 10), 0.7), ((30, 0, 0), 0.6)]]
    truths = [[((0, 0, 0), 10.0), ((50, 0, 0), 6.0)], [((0, 0, 0), 4.0)]]
    ignore = [[], [((30, 1, 0), 5.0)]]
    r = froc_cpm(preds, truths, n_scans=2, ignore=ignore)
    assert (r.n_nodules, r.n_true_positives, r.n_false_positives, r.n_ignored, r.n_double) == (3, 2, 2, 1, 1)
    # curve: (0,0) -> 0.9 TP (0,1/3) -> 0.8 FP (0.5,1/3) -> 0.7 FP (1,1/3) -> 0.3 TP (1,2/3)
    assert r.fps.tolist() == [0, 0, 0.5, 1, 1]
    assert r.sensitivity.tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3, 2 / 3])
    assert r.sensitivities == pytest.approx([1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert r.cpm == pytest.approx(11 / 21)
    assert r.sensitivity_at(0.75) == pytest.approx(1 / 3) and r.sensitivity_at(100) == pytest.approx(2 / 3)


def test_froc_interpolates_linearly_and_groups_ties():
    # a TP and a FP at the same probability form one diagonal step from (0, 0) to (1, 1)
    r = froc_cpm([[((0, 0, 0), 0.9), ((50, 0, 0), 0.9)]], [[((0, 0, 0), 8.0)]])
    assert r.fps.tolist() == [0, 1] and r.sensitivity.tolist() == [0, 1]
    assert r.sensitivities == pytest.approx([0.125, 0.25, 0.5, 1, 1, 1, 1])
    assert r.cpm == pytest.approx(4.875 / 7)


def test_froc_boundaries():
    # exactly on the radius is not a hit (strict, as the LUNA16 script); a negative diameter means 10 mm
    m = match_scan([((3, 0, 0), 0.9), ((0, 4.9, 0), 0.8)], [((0, 0, 0), 6.0), ((0, 0, 0), -1)])
    assert m.nodule_probs == [None, 0.9] and m.fp_probs == []
    # no false positives at all: fps stays 0 and sensitivity is the detected fraction everywhere
    r = froc_cpm([[((0, 0, 0), 0.4)], []], [[((0, 0, 0), 5.0)], [((9, 9, 9), 5.0)]])
    assert r.cpm == pytest.approx(0.5) and r.n_false_positives == 0
    # no nodules: sensitivity undefined
    assert math.isnan(froc_cpm([[((0, 0, 0), 0.4)]], [[]]).cpm)
    with pytest.raises(ValueError):
        froc_cpm([[], []], [[], []], n_scans=1)


def test_froc_keeps_only_top_marks():
    preds = [[((0, 0, 0), 0.01)] + [((100 + i, 0, 0), 0.5 + i / 1000) for i in range(3)]]
    r = froc_cpm(preds, [[((0, 0, 0), 5.0)]], max_marks=3)
    assert r.n_true_positives == 0 and r.n_false_positives == 3
    assert froc_cpm(preds, [[((0, 0, 0), 5.0)]], max_marks=None).n_true_positives == 1


def test_verse_identification_rate_hand_computed():
    truth = [("L1", (0, 0, 0)), ("L2", (0, 0, 30)), ("L3", (0, 0, 60)), ("L4", (0, 0, 90))]
    pred = [("L1", (0, 0, 5)), ("L2", (0, 0, 14)), ("L3", (0, 0, 85)), ("T12", (0, 0, 31))]
    r = identification_rate(pred, truth)
    # L1 hit (5 mm); L2 hit (16 mm, T12 is not in the truth so it is not a competitor);
    # L3 closest but 25 mm > 20 -> miss; L4 not predicted -> miss
    assert (r.n_truth, r.n_identified) == (4, 2) and r.rate == 0.5
    assert r.mean_error_mm == pytest.approx((5 + 16 + 25) / 3)
    assert r.per_label["L4"] == {"identified": False, "error_mm": None}
    swapped = identification_rate([("L1", (0, 0, 30)), ("L2", (0, 0, 0))], [("L1", (0, 0, 0)), ("L2", (0, 0, 30))])
    assert swapped.rate == 0 and swapped.mean_error_mm == 30
    assert identification_rate([(5, (0, 0, 20))], [(5, (0, 0, 0))]).rate == 1.0       # 20 mm is still a hit
    agg = aggregate_id_rates([r, swapped])
    assert agg["id_rate"] == pytest.approx(0.25) and agg["id_rate_pooled"] == pytest.approx(2 / 6)
    assert agg["per_label"]["L1"]["id_rate"] == 0.5 and agg["per_label"]["L1"]["mean_error_mm"] == 17.5
    with pytest.raises(ValueError, match="twice"):
        identification_rate([("L1", (0, 0, 0)), ("L1", (0, 0, 1))], truth)


def test_tianchi_keypoints_hand_computed():
    spacing = (0.5, 0.8)                                     # DICOM (row, column)
    assert pixel_distance_mm((0, 0), (3, 4), spacing) == pytest.approx(math.hypot(2.4, 2.0))
    truth = {"L1": (10, 10), "L2": (10, 30), "L1-L2": (10, 20)}
    pred = {"L1": (17, 10), "L2": (10, 42)}                  # 5.6 mm (hit), 6.0 mm (miss: strictly < 6)
    r = keypoint_hits(pred, truth, pixel_spacing=spacing, pred_classes={"L1": "v2", "L2": "v1"},
                      truth_classes={"L1": ["v2"], "L2": ["v1"], "L1-L2": ["v1", "v3"]})
    assert (r.n_truth, r.n_hit) == (3, 1) and r.hit_rate == pytest.approx(1 / 3)
    assert r.mean_error_mm == pytest.approx(5.8)
    assert r.confusion["vertebra_v2"]["vertebra_v2"] == 1 and r.confusion["wrong"]["vertebra_v1"] == 1
    assert r.confusion["not_hit"]["disc_v1"] == 1 and r.confusion["not_hit"]["disc_v3"] == 1
    assert r.macro_f1 == pytest.approx(1 / 7)                # only vertebra_v2 has F1 = 1
    mm = keypoint_hits({"L1": (0, 0, 5.9)}, {"L1": (0, 0, 0)})
    assert mm.hit_rate == 1.0 and mm.macro_f1 is None
    agg = aggregate_keypoints([r, mm])
    assert agg["hit_rate"] == pytest.approx(2 / 4) and agg["per_tag"]["L1"]["hit_rate"] == 1.0
    assert agg["macro_f1"] == pytest.approx(1 / 7)
