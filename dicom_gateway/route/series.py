"""Series summaries: what routing and series selection know about each series of a study.

A summary is built either from the job store's instance rows (header fields recorded by the SCP) or,
for `dxgate rules test`, by reading the headers of a folder of DICOM files (pixels are not read).
Summaries carry UIDs and technical attributes only, never patient data.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dicom_gateway.assemble.evidence import SeriesEvidence, series_evidence
from dicom_gateway.errors import UnparsableDatasetError
from dicom_gateway.receive.headers import classify_orientation, instance_record, read_header_file

__all__ = ["SeriesSummary", "classify_orientation", "summarise_folder", "summarise_series"]


@dataclass(frozen=True)
class SeriesSummary:
    """One series of a study as routing sees it (PS3.3 C.7.3.1 General Series, C.7.6.2 Image Plane)."""

    series_uid: str
    modality: str | None
    body_part: str | None
    series_description: str | None
    series_number: int | None
    slice_thickness: float | None
    orientation: str | None  # axial | sagittal | coronal | oblique; the majority of the instances
    n_instances: int
    calling_ae: str | None
    sop_instance_uids: tuple[str, ...]
    paths: tuple[str, ...]
    study_uid: str | None = None
    evidence: SeriesEvidence | None = None  # count evidence (assemble.evidence); None: not computed

    def label(self) -> str:
        """A short, patient-free name for messages: series number and UID."""
        number = f"#{self.series_number} " if self.series_number is not None else ""
        return f"{number}{self.series_uid}"

    def describe(self) -> str:
        """Technical one-liner used in reasons, e.g. `#3 1.2.3 (CT, axial, 1.0 mm, 120 images)`."""
        thickness = f"{self.slice_thickness:g} mm" if self.slice_thickness is not None else "thickness ?"
        return (f"{self.label()} ({self.modality or '?'}, {self.orientation or 'orientation ?'}, {thickness},"
                f" {self.n_instances} images)")


def _field(row: Mapping[str, Any] | Any, key: str) -> Any:
    """row[key] for dicts and sqlite3.Row alike; None when the column is absent."""
    keys = row.keys()
    return row[key] if key in keys else None


def _majority(values: Iterable[Any]) -> Any:
    """The most common non-empty value (first seen wins a tie), or None."""
    counts = Counter(v for v in values if v is not None and v != "")
    return counts.most_common(1)[0][0] if counts else None


def _instance_sort_key(row: Mapping[str, Any]) -> tuple[int, float, str]:
    number = _field(row, "instance_number")
    return (0 if number is not None else 1, float(number) if number is not None else 0.0,
            str(_field(row, "sop_instance_uid")))


def summarise_series(rows: Iterable[Mapping[str, Any] | Any]) -> list[SeriesSummary]:
    """Group instance rows (job store rows or dicts) into series summaries, ordered by series number.

    Attributes that may differ between instances (thickness, orientation, ...) take the majority value;
    each summary carries its series' count evidence (complete, incomplete, ...).
    """
    by_series: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        by_series[str(_field(row, "series_uid"))].append(row)
    out: list[SeriesSummary] = []
    for series_uid, members in by_series.items():
        members.sort(key=_instance_sort_key)

        def values(key: str, members: list[Any] = members) -> list[Any]:
            return [_field(m, key) for m in members]

        thickness = _majority(values("slice_thickness"))
        number = _majority(values("series_number"))
        out.append(SeriesSummary(
            series_uid=series_uid,
            modality=_majority(values("modality")),
            body_part=_majority(values("body_part")),
            series_description=_majority(values("series_description")),
            series_number=int(number) if number is not None else None,
            slice_thickness=float(thickness) if thickness is not None else None,
            orientation=_majority(values("orientation")),
            n_instances=len(members),
            calling_ae=_majority(values("calling_ae")),
            sop_instance_uids=tuple(str(u) for u in values("sop_instance_uid")),
            paths=tuple(str(p) for p in values("path") if p is not None),
            study_uid=_majority(values("study_uid")),
            evidence=series_evidence(members),
        ))
    out.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_uid))
    return out


def summarise_folder(folder: Path) -> list[SeriesSummary]:
    """Summarise every DICOM file under folder (recursively), reading headers only (no pixel data).

    Header fields come from `dicom_headers.instance_record`, exactly as the SCP records them, so a
    folder is routed the way the running gateway would route it. Files that are not DICOM, or lack
    Study/Series/SOP Instance UIDs, are skipped.
    """
    rows: list[dict[str, Any]] = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            ds = read_header_file(path)
            meta = getattr(ds, "file_meta", None)
            syntax = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None
            rec = instance_record(ds, path=path, size=path.stat().st_size, transfer_syntax=syntax,
                                  calling_ae=None, association_id=None)
        except (UnparsableDatasetError, OSError):  # MissingIdentifierError is an UnparsableDatasetError
            continue
        rows.append(asdict(rec))
    return summarise_series(rows)
