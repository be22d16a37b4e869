"""The second stage's evaluation scores what the gateway reports: first-stage components measured at the
threshold, blobs suppressed beside them and beside each other, swept over the threshold (hand-computed cases)."""

from __future__ import annotations

import numpy as np
import pytest

from training.second_stage_eval import choose_threshold, figures, served_curve, served_findings


def _row(components, blobs, diameters=None, component_diameters=None, levels=None) -> dict:
    row = {"seed": 0, "components": components, "blobs": blobs,
           "diameters": diameters if diameters is not None else [4.0] * len(blobs),
           "first_stage_s": 1.0, "second_stage_s": 1.0}
    if component_diameters is not None:
        row["component_diameters"], row["diameter_levels"] = component_diameters, levels
    return row


def _entry(*nodules) -> dict:
    return {"seed": 0, "nodules": [{"centre_mm": list(c), "diameter_mm": d} for c, d in nodules]}


def test_a_blob_on_a_large_components_edge_is_the_same_nodule_at_the_measured_diameter() -> None:
    """A 16 mm component (radius 8 at p 0.9) suppresses a blob 9.5 mm away (8 + 4 mm); with no measured
    diameter (rows scored before diameters were kept) a 2 mm radius is assumed and the blob stays."""
    comp = [([0.0, 0.0, 0.0], 0.99)]
    blob = [([9.5, 0.0, 0.0], 0.988)]
    measured = _row(comp, blob, component_diameters=[[20.0, 16.0, 10.0]], levels=[0.5, 0.9, 0.99])
    assert [p for _, p in served_findings(measured, 0.9)] == [0.99]
    # at 0.985 the component measures 16 - 6 * 0.085 / 0.09 = 10.3 mm: radius 5.2 + 4 < 9.5, the blob stays
    assert [p for _, p in served_findings(measured, 0.985)] == [0.99, 0.988]
    assert [p for _, p in served_findings(_row(comp, blob), 0.9)] == [0.99, 0.988]


def test_a_kept_blob_suppresses_within_its_own_radius_plus_4_mm() -> None:
    blobs = [([0.0, 0.0, 0.0], 0.9), ([7.0, 0.0, 0.0], 0.8), ([20.0, 0.0, 0.0], 0.7)]
    assert [p for _, p in served_findings(_row([], blobs, diameters=[8.0, 4.0, 4.0]), 0.5)] == [0.9, 0.7]
    assert [p for _, p in served_findings(_row([], blobs, diameters=[4.0, 4.0, 4.0]), 0.5)] == [0.9, 0.8, 0.7]


def test_the_served_curve_counts_hits_and_false_positives_at_each_threshold() -> None:
    # scan 1: a 10 mm nodule at the origin hit by a blob (0.9), a false positive blob far away (0.8);
    # scan 2: a 6 mm nodule hit only by a weak blob (0.6), a false positive component (0.95)
    rows = [_row([], [([1.0, 0.0, 0.0], 0.9), ([50.0, 0.0, 0.0], 0.8)]),
            _row([([0.0, 60.0, 0.0], 0.95)], [([0.0, 0.0, 1.0], 0.6)])]
    entries = [_entry(((0.0, 0.0, 0.0), 10.0)), _entry(((0.0, 0.0, 0.0), 6.0))]
    curve = served_curve(rows, entries, floor=0.3)
    assert curve.thresholds.tolist() == [0.95, 0.9, 0.8, 0.6]
    assert curve.fps.tolist() == [0.5, 0.5, 1.0, 1.0]
    assert curve.sensitivity.tolist() == [0.0, 0.5, 0.5, 1.0]
    assert curve.sensitivity_at(0.5) == 0.5 and curve.sensitivity_at(1.0) == 1.0 and curve.sensitivity_at(0.25) == 0
    assert curve.cpm == pytest.approx((0 + 0 + 0.5 + 1 + 1 + 1 + 1) / 7)
    # at most 0.5 FP per scan: thresholds 0.95 and 0.9 qualify, the cut lies halfway to the next one down
    op = choose_threshold(rows, entries, 0.5, floor=0.3)
    assert op["probability"] == pytest.approx(0.85) and op["calibration_fp_per_scan"] == 0.5
    assert op["calibration_sensitivity"] == 0.5 and op["calibration_nodules"] == 2
    held = figures(rows, entries, op["probability"])
    assert held["sensitivity_at_1fp_per_scan"] == 1.0 and held["operating_point"]["fp_per_scan"] == 0.5
    assert held["operating_point"]["found_by_size"] == {"3-6 mm": "0/0", "6-10 mm": "0/1", "10-30 mm": "1/1"}
    assert 0 <= held["candidate_union"]["cpm"] <= 1


def test_a_second_mark_on_a_hit_nodule_is_neither_a_hit_nor_a_false_positive() -> None:
    rows = [_row([([0.0, 0.0, 0.0], 0.99)], [([2.0, 0.0, 0.0], 0.9)])]   # both inside the 10 mm nodule
    rows[0]["component_diameters"], rows[0]["diameter_levels"] = [[0.0, 0.0]], [0.0, 1.0]   # radius 0: no suppression
    curve = served_curve(rows, [_entry(((0.0, 0.0, 0.0), 10.0))], floor=0.3)
    assert np.all(curve.fps == 0) and curve.sensitivity.tolist() == [1.0, 1.0]


def test_the_sweep_stops_past_the_highest_fp_rate_it_reports() -> None:
    """Blobs far from the one nodule, one per probability: the sweep ends at the first threshold with more than
    8 false positives per scan (an untrained classifier's thousands of blobs would otherwise take hours)."""
    blobs = [([100.0 + 10 * k, 0.0, 0.0], 0.99 - 0.001 * k) for k in range(500)] + [([0.0, 0.0, 0.0], 0.4)]
    rows = [_row([], blobs)]
    curve = served_curve(rows, [_entry(((0.0, 0.0, 0.0), 10.0))], floor=0.3)
    assert len(curve.thresholds) == 9 and curve.fps[-1] == 9.0 and curve.fps[-2] == 8.0
    assert curve.sensitivity_at(8.0) == 0.0
    # a target above 8 FP/scan sweeps as far as it needs
    assert choose_threshold(rows, [_entry(((0.0, 0.0, 0.0), 10.0))], 20.0, floor=0.3)["calibration_fp_per_scan"] == 20


def test_blobs_of_one_nodule_are_reported_at_their_weighted_centre() -> None:
    """Two blobs near 1 on either side of a 4 mm nodule's centre, each 2.2 mm off (outside its 2 mm radius): the
    most probable alone would miss it, the group's centre hits it. A first-stage finding's own blobs stay out."""
    blobs = [([2.2, 0.0, 0.0], 0.9998), ([-2.2, 0.0, 0.0], 0.9996), ([40.0, 0.0, 0.0], 0.999)]
    rows = [_row([([41.0, 0.0, 0.0], 0.99)], blobs)]
    marks = served_findings(rows[0], 0.9)
    assert len(marks) == 2 and marks[0] == ((41.0, 0.0, 0.0), 0.99)
    assert np.allclose(marks[1][0], [2.2 * (0.9998 - 0.9996) / (0.9998 + 0.9996), 0, 0]) and marks[1][1] == 0.9998
    curve = served_curve(rows, [_entry(((0.0, 0.0, 0.0), 4.0))], floor=0.3)
    assert curve.sensitivity_at(1.0) == 1.0


def test_a_component_under_the_first_stages_minimum_diameter_is_not_reported() -> None:
    """The gateway drops first-stage findings under `thresholds.min_diameter_mm` at the threshold it applies: a
    component measuring 1.5 mm at p 0.9 (3 mm at 0.5) is no mark at 0.9 with a 2 mm minimum, and is one at 0.5.
    Rows without measured diameters keep every component (nothing to measure)."""
    row = _row([([50.0, 0.0, 0.0], 0.95)], [], component_diameters=[[3.0, 1.5]], levels=[0.5, 0.9])
    assert served_findings(row, 0.9, min_diameter_mm=2.0) == []
    assert len(served_findings(row, 0.5, min_diameter_mm=2.0)) == 1
    assert len(served_findings(_row([([50.0, 0.0, 0.0], 0.95)], []), 0.9, min_diameter_mm=2.0)) == 1
    curve = served_curve([row], [_entry(((0.0, 0.0, 0.0), 10.0))], floor=0.3, min_diameter_mm=2.0)
    assert curve.fps.tolist() == [0.0]      # the only threshold, 0.95: the component measures 1.5 mm there
