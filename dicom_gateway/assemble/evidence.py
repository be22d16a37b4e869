"""Count evidence: does a series hold every image its headers say it should? Pure; no I/O.

A C-STORE push has no "series complete" message (PS3.4 B), so the only evidence is in the headers the
SCP recorded per instance:

- Images in Acquisition (0020,1002, PS3.3 C.7.6.1 General Image, Type 3): fewer distinct instances
  than the largest value given is an incomplete series; at least as many is a complete one.
- The slice grid: Image Position (Patient) along the slice normal (PS3.3 C.7.6.2.1.1) of the images
  that share the series' usual orientation and matrix. Equally spaced positions are a regular grid
  (consistent, but no proof that the end of the series arrived); a missing step in an otherwise
  regular grid is a gap, an incomplete series.

Anything else (too few positions, irregular spacing, no positions) is no evidence either way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

MIN_GRID_POSITIONS = 3
"""A grid needs at least this many distinct slice positions to show a step (and so a gap)."""

POSITION_DECIMALS = 2
"""Slice positions are compared at 0.01 mm: instances at the same position (phases, echoes) are one."""

MIN_STEP_MM = 0.1
"""Distinct positions closer than this form no slice grid."""

STEP_TOLERANCE = 0.05
"""A spacing is k steps when it is within this fraction of a step of k * step."""


class Completeness(StrEnum):
    """What the headers say about one series."""

    COMPLETE = "complete"  # at least Images in Acquisition distinct instances, no gap
    CONSISTENT = "consistent"  # a regular grid without gaps; no count to compare with
    INCOMPLETE = "incomplete"  # fewer than Images in Acquisition, or a gap in the grid
    UNKNOWN = "unknown"  # no evidence either way


@dataclass(frozen=True)
class SeriesEvidence:
    """The count evidence of one series; `reason` says why it is incomplete (no patient data)."""

    state: Completeness
    n_images: int
    expected: int | None = None  # the largest Images in Acquisition given
    missing_positions: int | None = None  # None: no regular grid; 0: regular; k: k positions missing

    @property
    def complete(self) -> bool:
        """Whether the count evidence shows every image arrived."""
        return self.state == Completeness.COMPLETE

    @property
    def incomplete(self) -> bool:
        """Whether the headers show images missing."""
        return self.state == Completeness.INCOMPLETE

    @property
    def reason(self) -> str | None:
        """`incomplete series: 60 of 120 images` or `... gap in slice positions (3 missing)`; None if not."""
        if not self.incomplete:
            return None
        if self.expected is not None and self.n_images < self.expected:
            return f"incomplete series: {self.n_images} of {self.expected} images"
        return f"incomplete series: gap in slice positions ({self.missing_positions} missing)"


def _field(row: Mapping[str, Any] | Any, key: str) -> Any:
    """row[key] for dicts and sqlite3.Row alike; None when the column is absent."""
    keys = row.keys()  # a sqlite3.Row's `in` tests values, not keys
    return row[key] if key in keys else None


def missing_grid_positions(positions: Iterable[float]) -> int | None:
    """Positions missing from a regular grid: 0 when regular, k for k missing steps, None if no grid.

    The step is the smallest spacing between distinct positions (refined over the whole span); every
    spacing must be a whole number of steps, else the positions form no grid (jitter, or a series a
    loader must judge). A series sent in a scattered order and cut short leaves many such holes.
    """
    distinct = sorted({round(float(p), POSITION_DECIMALS) for p in positions})
    if len(distinct) < MIN_GRID_POSITIONS:
        return None
    spacings = [b - a for a, b in zip(distinct, distinct[1:], strict=False)]
    if min(spacings) < MIN_STEP_MM:
        return None
    steps = [round(d / min(spacings)) for d in spacings]
    step = (distinct[-1] - distinct[0]) / sum(steps)
    if any(abs(d - k * step) > STEP_TOLERANCE * step for d, k in zip(spacings, steps, strict=True)):
        return None
    return sum(k - 1 for k in steps)


def _usual_geometry(rows: Sequence[Any]) -> list[Any]:
    """The instances with the series' most common (orientation, rows, columns): localisers left out."""
    key = Counter((_field(r, "orientation"), _field(r, "rows"), _field(r, "columns")) for r in rows)
    if not key:
        return []
    usual = key.most_common(1)[0][0]
    return [r for r in rows if (_field(r, "orientation"), _field(r, "rows"), _field(r, "columns")) == usual]


def series_evidence(rows: Iterable[Mapping[str, Any] | Any]) -> SeriesEvidence:
    """The count evidence of one series from its instance rows (job store rows or dicts)."""
    members = list(rows)
    n = len({str(_field(r, "sop_instance_uid")) for r in members})
    counts = [int(v) for v in (_field(r, "images_in_acquisition") for r in members) if v is not None and int(v) > 0]
    expected = max(counts) if counts else None
    positions = [_field(r, "slice_position") for r in _usual_geometry(members)]
    # a slice without a usable position (none, NaN) is no evidence of a gap: the loader names what is wrong
    missing = missing_grid_positions(positions) if None not in positions else None
    if (expected is not None and n < expected) or missing:
        state = Completeness.INCOMPLETE
    elif expected is not None:
        state = Completeness.COMPLETE
    elif missing == 0:
        state = Completeness.CONSISTENT
    else:
        state = Completeness.UNKNOWN
    return SeriesEvidence(state=state, n_images=n, expected=expected, missing_positions=missing)
