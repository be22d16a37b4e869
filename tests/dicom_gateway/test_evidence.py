"""Count evidence per series: Images in Acquisition and the slice grid (assemble.evidence)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dicom_gateway.assemble.evidence import Completeness, missing_grid_positions, series_evidence
from dicom_gateway.receive.headers import instance_record, read_header_file
from harness.ct import write_ct_series


def _rows(positions: list[float], *, expected: int | None = None, orientation: str = "axial",
          size: int = 512) -> list[dict[str, Any]]:
    return [{"sop_instance_uid": f"2.25.{i}", "instance_number": i + 1, "slice_position": p,
             "images_in_acquisition": expected, "orientation": orientation, "rows": size, "columns": size}
            for i, p in enumerate(positions)]


@pytest.mark.parametrize(("positions", "missing"), [
    ([0.0, 1.25, 2.5, 3.75], 0),
    ([-100.0, -97.5, -95.0, -92.5, -90.0], 0),
    ([0.0, 1.0, 2.0, 4.0, 5.0], 1),  # one step missing
    ([0.0, 1.0, 2.0, 3.0, 7.0, 8.0], 3),  # three steps missing
    ([5.0, 1.0, 3.0, 2.0], 1),  # order does not matter
    ([0.0, 0.0, 1.0, 1.0, 2.0, 2.0], 0),  # two phases at the same positions
    ([0.0, 1.0004, 1.9996, 3.0], 0),  # rounding in the headers
    ([0.0, 1.0], None),  # too few to show a step
    ([0.0, 1.0, 2.7, 3.7], None),  # not a whole number of steps
    ([0.0, 2.0, 3.0, 6.0, 8.0, 9.0], 4),  # scattered holes: what a cut-short shuffled send leaves
    ([0.0, 1.0, 2.1, 3.0], None),  # jitter beyond the tolerance: for the loader to judge
    ([0.0, 0.05, 1.0], None),  # not a slice grid
    ([-200.0 + 0.625 * k for k in range(400) if k % 7], 56),  # every 7th of 400 thin slices missing (56 inside)
])
def test_missing_grid_positions(positions: list[float], missing: int | None) -> None:
    assert missing_grid_positions(positions) == missing


def test_fewer_images_than_images_in_acquisition_is_incomplete() -> None:
    ev = series_evidence(_rows([float(k) for k in range(60)], expected=120))
    assert ev.state == Completeness.INCOMPLETE and ev.incomplete and not ev.complete
    assert ev.reason == "incomplete series: 60 of 120 images"


def test_all_images_of_the_acquisition_is_complete() -> None:
    ev = series_evidence(_rows([float(k) for k in range(120)], expected=120))
    assert ev.state == Completeness.COMPLETE and ev.complete and ev.reason is None


def test_a_gap_is_incomplete_even_without_a_count() -> None:
    positions = [float(k) for k in range(40) if k not in (10, 11, 25)]
    ev = series_evidence(_rows(positions))
    assert ev.state == Completeness.INCOMPLETE
    assert ev.reason == "incomplete series: gap in slice positions (3 missing)"


def test_a_gap_is_incomplete_even_when_the_count_is_met() -> None:
    positions = [float(k) for k in range(12) if k != 5]
    assert series_evidence(_rows(positions, expected=10)).state == Completeness.INCOMPLETE


def test_a_regular_grid_without_a_count_is_only_consistent() -> None:
    ev = series_evidence(_rows([2.5 * k for k in range(30)]))
    assert ev.state == Completeness.CONSISTENT and not ev.complete and not ev.incomplete
    assert ev.missing_positions == 0


def test_no_positions_is_no_evidence() -> None:
    rows = [{"sop_instance_uid": "2.25.1"}, {"sop_instance_uid": "2.25.2"}]  # e.g. no Image Plane module
    assert series_evidence(rows).state == Completeness.UNKNOWN


def test_a_localiser_in_the_series_does_not_break_the_grid() -> None:
    rows = _rows([float(k) for k in range(20)])
    rows.append({"sop_instance_uid": "2.25.99", "slice_position": 250.0, "orientation": "coronal",
                 "rows": 256, "columns": 256, "images_in_acquisition": None})
    assert series_evidence(rows).state == Completeness.CONSISTENT


def test_duplicate_rows_count_once() -> None:
    rows = _rows([float(k) for k in range(5)], expected=6)
    assert series_evidence([*rows, rows[0]]).reason == "incomplete series: 5 of 6 images"


def test_evidence_from_real_headers(tmp_path: Path) -> None:
    """The SCP's header parsing feeds the evidence: positions along the normal, Images in Acquisition."""
    paths = write_ct_series(tmp_path, 6, slice_thickness=2.0)
    records = []
    for p in paths[:2] + paths[3:]:  # the third slice never arrived
        ds = read_header_file(p)
        records.append(instance_record(ds, path=p, size=1, transfer_syntax=None, calling_ae=None,
                                       association_id=None).__dict__)
    assert series_evidence(records).reason == "incomplete series: gap in slice positions (1 missing)"
    for r in records:
        r["images_in_acquisition"] = 6
    assert series_evidence(records).reason == "incomplete series: 5 of 6 images"


def test_a_slice_without_a_position_is_no_evidence_of_a_gap() -> None:
    """A missing or NaN ImagePositionPatient (recorded as None) is left to the loader to name, not called a gap."""
    rows = _rows([0.0, 1.0, 2.0, 3.0, 4.0])
    rows[2]["slice_position"] = None
    evidence = series_evidence(rows)
    assert not evidence.incomplete and evidence.reason is None
    assert evidence.state == Completeness.UNKNOWN
