"""The second stage's evaluation scores what the gateway reports: first-stage components measured at the
threshold as the gateway's postprocess measures them, blobs suppressed beside them and beside each other, swept
over the threshold (hand-computed cases, and the gateway's own postprocess on a probability map)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from inference.model_card import Thresholds
from training.scoring.served import (
    ServedCase,
    choose_threshold,
    false_positive_budget,
    figures,
    first_stage_findings,
    served_curve,
    served_findings,
)

REPO = Path(__file__).resolve().parents[2]


def _row(components, blobs, diameters=None, voxels=None, voxel_mm3=1.0) -> dict:
    """A scored case; `voxels`, one per component: [(probability, HU, (x, y, z) mm), ...] of its source voxels."""
    row = {"seed": 0, "components": components, "blobs": blobs,
           "diameters": diameters if diameters is not None else [4.0] * len(blobs),
           "first_stage_s": 1.0, "second_stage_s": 1.0}
    if voxels is not None:
        ordered = [sorted(v, key=lambda x: -x[0]) for v in voxels]
        row.update(source_voxel_mm3=voxel_mm3, component_probs=[[p for p, _, _ in v] for v in ordered],
                   component_hu=[[h for _, h, _ in v] for v in ordered],
                   component_mm=[[list(m) for _, _, m in v] for v in ordered])
    return row


def _voxels(counts: dict[float, int], hu: float = -500.0, at=(0.0, 0.0, 0.0)) -> list:
    """`counts[p]` source voxels of probability p, all at `at`."""
    return [(p, hu, at) for p, n in counts.items() for _ in range(n)]


def _entry(*nodules) -> dict:
    return {"seed": 0, "nodules": [{"centre_mm": list(c), "diameter_mm": d} for c, d in nodules]}


def test_a_blob_on_a_large_components_edge_is_the_same_nodule_at_the_measured_diameter() -> None:
    """A component of 2145 voxels of 1 mm3 above 0.9 (16.0 mm, radius 8) suppresses a blob 9.5 mm away (8 + 4 mm);
    above 0.985 only its 524-voxel core counts (10.0 mm: 5 + 4 < 9.5) and the blob stays. With no measured voxels
    (rows scored before they were kept) a 2 mm radius is assumed."""
    comp = [([0.0, 0.0, 0.0], 0.99)]
    blob = [([9.5, 0.0, 0.0], 0.988)]
    measured = _row(comp, blob, voxels=[_voxels({0.99: 524, 0.95: 2145 - 524, 0.6: 3000})])
    assert [p for _, p in served_findings(measured, 0.9)] == [0.99]
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


def test_the_false_positive_budget_is_the_exact_poisson_upper_bound() -> None:
    """One-sided upper bounds from chi-squared tables: at 90 %, 5 events -> 9.27, 6 -> 10.53; at 95 %,
    4 -> 9.15, 5 -> 10.51; none on one scan still bounds the rate only at 2.30."""
    assert false_positive_budget(10, 1.0, 0.9) == 5
    assert false_positive_budget(10, 1.0, 0.95) == 4
    assert false_positive_budget(20, 0.5, 0.9) == 5
    assert false_positive_budget(1, 1.0, 0.9) == 0


def test_with_a_confidence_the_threshold_keeps_only_the_budgeted_false_positives() -> None:
    """Ten calibration scans, each a 10 mm nodule hit by a blob at 0.95 and one false positive blob at
    0.50, 0.54, ... 0.86. Ten FPs are 1 per scan, so the plain rule goes down to the floor; 90 % sure of <= 1 per
    unseen scan allows five (0.86 ... 0.70): the cut lies halfway between 0.70 and 0.66."""
    rows = [_row([], [([0.0, 0.0, 0.0], 0.95), ([60.0, 0.0, 0.0], 0.5 + 0.04 * i)]) for i in range(10)]
    entries = [_entry(((0.0, 0.0, 0.0), 10.0)) for _ in range(10)]
    plain = choose_threshold(rows, entries, 1.0, floor=0.3)
    assert plain["probability"] == pytest.approx(0.4) and plain["calibration_fp_per_scan"] == 1.0
    assert "confidence" not in plain
    sure = choose_threshold(rows, entries, 1.0, floor=0.3, confidence=0.9)
    assert sure["probability"] == pytest.approx(0.68) and sure["calibration_fp_per_scan"] == 0.5
    assert sure["calibration_fp_budget"] == 5 and sure["confidence"] == 0.9
    assert sure["target_fp_per_scan"] == 1.0 and sure["calibration_sensitivity"] == 1.0


def test_a_second_mark_on_a_hit_nodule_is_neither_a_hit_nor_a_false_positive() -> None:
    # both inside the 10 mm nodule; the component's one tiny voxel leaves the blob 4.5 mm away unsuppressed
    rows = [_row([([0.0, 0.0, 0.0], 0.99)], [([4.5, 0.0, 0.0], 0.9)], voxels=[_voxels({0.99: 1})], voxel_mm3=1e-6)]
    assert len(served_findings(rows[0], 0.5)) == 2
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
    most probable alone would miss it, the group's odds-weighted centre (0.73 mm off) hits it. A first-stage
    finding's own blobs stay out."""
    blobs = [([2.2, 0.0, 0.0], 0.9998), ([-2.2, 0.0, 0.0], 0.9996), ([40.0, 0.0, 0.0], 0.999)]
    rows = [_row([([41.0, 0.0, 0.0], 0.99)], blobs)]
    marks = served_findings(rows[0], 0.9)
    assert len(marks) == 2 and marks[0] == ((41.0, 0.0, 0.0), 0.99)
    o1, o2 = 0.9998 / 0.0002, 0.9996 / 0.0004                     # weights: the odds p / (1 - p)
    assert np.allclose(marks[1][0], [2.2 * (o1 - o2) / (o1 + o2), 0, 0]) and marks[1][1] == 0.9998
    curve = served_curve(rows, [_entry(((0.0, 0.0, 0.0), 4.0))], floor=0.3)
    assert curve.sensitivity_at(1.0) == 1.0


def test_a_component_is_held_to_the_first_stages_limits_at_the_threshold() -> None:
    """The gateway drops first-stage findings under `thresholds.min_diameter_mm` or outside min/max_mean_hu, as
    measured on the voxels above the threshold it applies. One voxel of a 1.5 mm sphere above 0.9 is no mark
    with a 2 mm minimum; with 7 more above 0.5 it measures 3 mm and is one. Rows without measured voxels keep
    every component (nothing to measure)."""
    one = math.pi * 1.5**3 / 6
    row = _row([([50.0, 0.0, 0.0], 0.95)], [], voxels=[_voxels({0.95: 1, 0.6: 7}, at=(50.0, 0.0, 0.0))],
               voxel_mm3=one)
    limits = Thresholds(min_diameter_mm=2.0)
    assert served_findings(row, 0.9, limits) == []
    assert [p for _, p in served_findings(row, 0.5, limits)] == [0.95]
    assert len(served_findings(_row([([50.0, 0.0, 0.0], 0.95)], []), 0.9, limits)) == 1
    # the sweep samples where the mark appears: 3 voxels (2.16 mm) are the first to pass, at p 0.6
    curve = served_curve([row], [_entry(((0.0, 0.0, 0.0), 10.0))], floor=0.3, limits=limits)
    assert curve.thresholds.tolist() == [0.6] and curve.fps.tolist() == [1.0]
    # an air-dense core (-950 HU) fails min_mean_hu -900 at 0.9; with its -300 HU rim above 0.5 it averages -625
    dense = _row([([50.0, 0.0, 0.0], 0.95)], [], voxels=[_voxels({0.95: 8}, hu=-950.0) + _voxels({0.6: 8}, -300.0)])
    assert served_findings(dense, 0.9, Thresholds(min_mean_hu=-900.0)) == []
    assert len(served_findings(dense, 0.5, Thresholds(min_mean_hu=-900.0))) == 1


def test_a_component_is_reported_at_the_centroid_and_maximum_of_its_voxels_above_the_threshold() -> None:
    voxels = [(0.99, 0.0, (0.0, 0.0, 0.0)), (0.8, 0.0, (2.0, 0.0, 0.0)), (0.7, 0.0, (4.0, 3.0, 0.0))]
    case = ServedCase.of(_row([([9.0, 9.0, 9.0], 0.999)], [], voxels=[voxels]))
    (centre, p, _), = first_stage_findings(case, 0.9)
    assert centre.tolist() == [0.0, 0.0, 0.0] and p == 0.99
    (centre, p, _), = first_stage_findings(case, 0.5)
    assert centre.tolist() == [2.0, 1.0, 0.0] and p == 0.99
    assert first_stage_findings(case, 0.995) == []      # no voxel above it: the model-grid maximum does not count


@pytest.mark.parametrize("spacing", [(1.25, 0.7, 0.7), (2.5, 0.9, 0.9)])
def test_first_stage_findings_are_those_of_the_gateways_postprocess(spacing) -> None:
    """Separate blobs on a 1.5 mm model grid, mapped to the source grid: what `source_voxels` keeps gives, at each
    threshold, the findings of `inference.postprocess.nodules` (probability, diameter, centre), limits included."""
    from scipy import ndimage

    from inference.model_repo import load_model
    from inference.postprocess import nodules
    from inference.preprocess import ResampleInfo, resampled_shape
    from inference.volume import Volume
    from training.scoring.cases import component_labels
    from training.scoring.served import source_voxels

    shape = (int(40 / spacing[0]), int(48 / spacing[1]), int(48 / spacing[2]))
    rng = np.random.default_rng(7)
    vol = Volume(voxels=rng.normal(-700.0, 150.0, shape).astype(np.float32), spacing=spacing,
                 origin=np.array([-20.0, -24.0, 30.0]), direction=np.eye(3),
                 sop_instance_uids=[f"1.2.3.{k}" for k in range(shape[0])], modality="CT",
                 frame_of_reference_uid="1.2.3.99")
    model_shape = resampled_shape(vol.shape, spacing, (1.5, 1.5, 1.5))
    info = ResampleInfo.of(vol, (1.5, 1.5, 1.5), model_shape)
    prob = np.zeros(model_shape, np.float32)
    for centre, peak, sigma in [((8, 10, 10), 0.99, 1.6), ((8, 22, 20), 0.93, 0.9), ((18, 12, 24), 0.8, 1.2),
                                ((18, 24, 8), 0.97, 0.6), ((12, 6, 26), 0.6, 2.0)]:
        point = np.zeros(model_shape, np.float32)
        point[centre] = 1.0
        blob = ndimage.gaussian_filter(point, sigma)
        prob = np.maximum(prob, peak * blob / blob.max())
    labels = component_labels(prob)
    ids = list(range(1, int(labels.max()) + 1))
    assert len(ids) == 5
    measured = source_voxels(prob, info, vol, labels, ids)
    row = _row([(m[2][0].tolist(), float(m[0][0])) for m in measured.values()], [],
               voxels=[list(zip(m[0].tolist(), m[1].tolist(), m[2].tolist(), strict=True)) for m in measured.values()],
               voxel_mm3=vol.voxel_volume_mm3)
    case = ServedCase.of(row)
    base = load_model(REPO / "models" / "lung_nodule_ct").card
    compared = 0
    for limits in (Thresholds(), Thresholds(min_diameter_mm=2.0, min_mean_hu=-720.0)):
        for t in (0.3, 0.5, 0.62, 0.75, 0.85, 0.9, 0.95, 0.98):
            card = base.model_copy(update={"thresholds": limits.model_copy(update={"probability": t})})
            found, _ = nodules(prob, vol, card, info)
            mine = first_stage_findings(case, t, limits)
            want = sorted((round(f.probability, 6), round(f.diameter_mm, 6), *np.round(f.centre_mm, 6)) for f in found)
            got = sorted((round(p, 6), round(2 * r, 6), *np.round(c, 6)) for c, p, r in mine)
            assert got == want, (limits, t)
            compared += len(found)
    assert compared > 20
