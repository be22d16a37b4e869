"""Study assembly: READY only after release and quiet time (per calling AE), and the abort grace."""

from __future__ import annotations

from pathlib import Path

from dicom_gateway.assemble.completeness import mark_ready_studies, route_ready_studies
from dicom_gateway.settings import Rule, RuleMatch, Settings
from dicom_gateway.store import InstanceRecord, Store
from inference.model_card import ModelCard
from inference.model_repo import RegisteredModel


def _rec(sop: str, ae: str, assoc: int, *, series: str = "9.9.1", z: float | None = None,
         expected: int | None = None) -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_uid="9.9",
                          series_uid=series, transfer_syntax=None, path="/x", size=1, calling_ae=ae,
                          association_id=assoc, modality="CT", body_part="CHEST", orientation="axial",
                          slice_thickness=1.0, rows=64, columns=64, images_in_acquisition=expected,
                          slice_position=z, instance_number=int(z) + 1 if z is not None else None)


def _send(store: Store, ae: str, slices: range, *, aborted: bool, series: str = "9.9.1",
          expected: int | None = None) -> int:
    """One association delivering slices (z = slice index, 1 mm apart), then released or aborted."""
    a = store.associations.open(ae, None)
    for k in slices:
        store.instances.record(_rec(f"{series}.{k}", ae, a, series=series, z=float(k), expected=expected))
    store.associations.close(a, aborted=aborted)
    return a


def _model(name: str) -> RegisteredModel:
    card = ModelCard.model_validate({
        "name": name, "version": "1.0.0", "task": "lung-nodule-detection", "description": "test",
        "modality": ["CT"], "body_part": ["CHEST"], "postprocess": "nodules",
        "input": {"spacing_mm": [1, 1, 1], "window": [-1000, 400], "roi_size": [32, 32, 32]},
        "output": {"channels": 1}, "labels": [], "weights_sha256": "0" * 64,
        "series": {"modalities": ["CT"], "orientation": ["axial"], "min_slices": 4}})
    return RegisteredModel(card=card, folder=Path("/models") / name, weights_path=Path("/models") / name / "m.onnx")


CHEST = Rule(name="chest", match=RuleMatch(modality=["CT"]), models=["lung"])


def test_ready_after_release_and_quiet(tmp_path: Path) -> None:
    store = Store(tmp_path / "j.db")
    settings = Settings(data_dir=tmp_path, quiet_seconds=2.0, quiet_seconds_by_ae={"SLOW": 30.0})
    a = store.associations.open("PACS", None)
    store.instances.record(_rec("1", "PACS", a))
    t0 = store.studies.get("9.9")["last_received_at"]
    assert mark_ready_studies(settings, store, now=lambda: t0 + 100) == []  # association still open
    store.associations.close(a)
    assert mark_ready_studies(settings, store, now=lambda: t0 + 1.0) == []  # not quiet yet
    assert mark_ready_studies(settings, store, now=lambda: t0 + 2.5) == ["9.9"]
    assert store.studies.get("9.9")["state"] == "READY"


def test_quiet_time_per_calling_ae(tmp_path: Path) -> None:
    store = Store(tmp_path / "j.db")
    settings = Settings(data_dir=tmp_path, quiet_seconds=2.0, quiet_seconds_by_ae={"SLOW": 30.0})
    a = store.associations.open("SLOW", None)
    store.instances.record(_rec("1", "SLOW", a))
    store.associations.close(a)
    t0 = store.studies.get("9.9")["last_received_at"]
    assert mark_ready_studies(settings, store, now=lambda: t0 + 10) == []
    assert mark_ready_studies(settings, store, now=lambda: t0 + 31) == ["9.9"]


def _settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, quiet_seconds=2.0, abort_grace_seconds=30.0, rules=[CHEST])


def _closed_at(store: Store, association_id: int) -> float:
    return store.db.one("SELECT closed_at FROM associations WHERE id=?", (association_id,))["closed_at"]


def test_an_aborted_association_waits_the_grace_a_released_one_does_not(tmp_path: Path) -> None:
    store = Store(tmp_path / "j.db")
    settings = _settings(tmp_path)
    a = _send(store, "PACS", range(10), aborted=True)
    t0 = _closed_at(store, a)
    assert store.studies.receiving()[0]["aborted_at"] == t0
    assert mark_ready_studies(settings, store, now=lambda: t0 + 5) == []  # quiet, but within the grace
    assert mark_ready_studies(settings, store, now=lambda: t0 + 29) == []
    assert mark_ready_studies(settings, store, now=lambda: t0 + 30.5) == ["9.9"]

    other = Store(tmp_path / "k.db")
    b = _send(other, "PACS", range(10), aborted=False)
    assert other.studies.receiving()[0]["aborted_at"] is None
    assert mark_ready_studies(settings, other, now=lambda: _closed_at(other, b) + 2.5) == ["9.9"]


def test_the_senders_retry_ends_the_grace(tmp_path: Path) -> None:
    store = Store(tmp_path / "j.db")
    settings = _settings(tmp_path)
    _send(store, "PACS", range(10), aborted=True)
    b = _send(store, "PACS", range(20), aborted=False)  # the retry re-sends everything; 10 are new
    assert store.studies.receiving()[0]["aborted_at"] is None
    assert mark_ready_studies(settings, store, now=lambda: _closed_at(store, b) + 2.5) == ["9.9"]


def test_a_parallel_release_does_not_end_the_grace(tmp_path: Path) -> None:
    """A second association opened before the abort, released after it, is no retry."""
    store = Store(tmp_path / "j.db")
    settings = _settings(tmp_path)
    a = store.associations.open("PACS", None)
    b = store.associations.open("PACS", None)
    for k in range(5):
        store.instances.record(_rec(f"9.9.1.{k}", "PACS", a, z=float(k)))
        store.instances.record(_rec(f"9.9.2.{k}", "PACS", b, series="9.9.2", z=float(k)))
    store.associations.close(a, aborted=True)
    store.associations.close(b)
    t0 = _closed_at(store, b)
    assert mark_ready_studies(settings, store, now=lambda: t0 + 5) == []
    assert mark_ready_studies(settings, store, now=lambda: t0 + 31) == ["9.9"]


def test_count_evidence_of_every_series_skips_the_grace(tmp_path: Path) -> None:
    store = Store(tmp_path / "j.db")
    settings = _settings(tmp_path)
    a = _send(store, "PACS", range(10), aborted=True, expected=10)  # aborted after the last image
    assert mark_ready_studies(settings, store, now=lambda: _closed_at(store, a) + 2.5) == ["9.9"]

    partial = Store(tmp_path / "k.db")
    b = _send(partial, "PACS", range(6), aborted=True, expected=10)
    assert mark_ready_studies(settings, partial, now=lambda: _closed_at(partial, b) + 2.5) == []


def test_an_incomplete_series_is_not_routed(tmp_path: Path) -> None:
    store = Store(tmp_path / "j.db")
    settings = _settings(tmp_path)
    a = _send(store, "PACS", range(6), aborted=True, expected=10)
    assert mark_ready_studies(settings, store, now=lambda: _closed_at(store, a) + 31) == ["9.9"]
    assert route_ready_studies(settings, store, {"lung": _model("lung")}) == 0
    study = store.studies.get("9.9")
    assert study["state"] == "UNROUTED"
    assert study["reason"] == "incomplete series: 6 of 10 images (series 9.9.1)"
    assert store.jobs.find(study_uid="9.9", limit=10) == []


def test_a_gap_excludes_its_series_and_a_complete_one_still_routes(tmp_path: Path) -> None:
    store = Store(tmp_path / "j.db")
    settings = _settings(tmp_path)
    a = store.associations.open("PACS", None)
    for k in [*range(0, 4), *range(6, 12)]:  # slices 4 and 5 never arrived
        store.instances.record(_rec(f"9.9.1.{k}", "PACS", a, z=float(k)))
    for k in range(8):
        store.instances.record(_rec(f"9.9.2.{k}", "PACS", a, series="9.9.2", z=float(k), expected=8))
    store.associations.close(a)
    assert mark_ready_studies(settings, store, now=lambda: _closed_at(store, a) + 2.5) == ["9.9"]
    assert route_ready_studies(settings, store, {"lung": _model("lung")}) == 1
    study = store.studies.get("9.9")
    assert study["state"] == "ROUTED"
    assert study["reason"].split("; ")[0] == "incomplete series: gap in slice positions (2 missing) (series 9.9.1)"
    (job,) = store.jobs.find(study_uid="9.9", limit=10)
    assert job["series_uid"] == "9.9.2"


def test_a_late_instance_reopens_an_incomplete_study(tmp_path: Path) -> None:
    store = Store(tmp_path / "j.db")
    settings = _settings(tmp_path)
    a = _send(store, "PACS", range(6), aborted=True, expected=8)
    mark_ready_studies(settings, store, now=lambda: _closed_at(store, a) + 31)
    route_ready_studies(settings, store, {"lung": _model("lung")})
    assert store.studies.get("9.9")["state"] == "UNROUTED"
    b = _send(store, "PACS", range(8), aborted=False, expected=8)
    study = store.studies.get("9.9")
    assert (study["state"], study["epoch"], study["reason"]) == ("RECEIVING", 2, None)
    assert mark_ready_studies(settings, store, now=lambda: _closed_at(store, b) + 2.5) == ["9.9"]
    assert route_ready_studies(settings, store, {"lung": _model("lung")}) == 1
    assert store.studies.get("9.9")["state"] == "ROUTED"
