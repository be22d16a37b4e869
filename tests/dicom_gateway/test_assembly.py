"""Study assembly: READY only after release and quiet time (per calling AE)."""

from __future__ import annotations

from pathlib import Path

from dicom_gateway.assemble.completeness import mark_ready_studies
from dicom_gateway.settings import Settings
from dicom_gateway.store import InstanceRecord, Store


def _rec(sop: str, ae: str, assoc: int) -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_uid="9.9",
                          series_uid="9.9.1", transfer_syntax=None, path="/x", size=1, calling_ae=ae,
                          association_id=assoc)


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
