"""Job store: idempotent instances, study epochs, the transition table, leases, deliveries, replay."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dicom_gateway.errors import JobStateError
from dicom_gateway.states import JOB_TRANSITIONS, JobState, StudyState
from dicom_gateway.store import InstanceRecord, Store


def _rec(sop: str, study: str = "1.2.3", assoc: int | None = None) -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_uid=study,
                          series_uid=study + ".1", transfer_syntax="1.2.840.10008.1.2.1", path=f"/x/{sop}.dcm",
                          size=10, calling_ae="PACS", association_id=assoc, modality="CT")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "jobs.sqlite3")


def _job(store: Store, uids: list[str] | None = None, dests: list[str] | None = None) -> int:
    job_id, _ = store.jobs.create(study_uid="1.2.3", model="m", model_version="1", series_uid="1.2.3.1",
                                  input_uids=uids or ["1.1"], destinations=dests or ["a"], rule="r")
    return job_id


def test_duplicate_instance_is_idempotent(store: Store) -> None:
    assert store.instances.record(_rec("1.1")) is True
    assert store.instances.record(_rec("1.1")) is False
    assert len(store.instances.of_study("1.2.3")) == 1


def test_open_association_keeps_study_receiving_and_late_instance_reopens(store: Store) -> None:
    a = store.associations.open("PACS", "127.0.0.1")
    store.instances.record(_rec("1.1", assoc=a))
    assert store.studies.receiving()[0]["open_associations"] == 1
    store.associations.close(a)
    assert store.studies.receiving()[0]["open_associations"] == 0
    assert store.studies.set_state("1.2.3", StudyState.READY, expect=StudyState.RECEIVING, epoch=1)
    store.instances.record(_rec("1.2"))  # late instance
    study = store.studies.get("1.2.3")
    assert study["state"] == StudyState.RECEIVING and study["epoch"] == 2
    # a stale READY transition for epoch 1 must not win
    assert not store.studies.set_state("1.2.3", StudyState.READY, expect=StudyState.RECEIVING, epoch=1)


def test_job_key_is_stable_and_late_series_supersedes(store: Store) -> None:
    first = _job(store, ["1.1"])
    assert store.jobs.create(study_uid="1.2.3", model="m", model_version="1", series_uid="1.2.3.1",
                             input_uids=["1.1"], destinations=["a"], rule="r") == (first, False)
    second = _job(store, ["1.1", "1.2"])
    assert second != first
    assert store.jobs.get(second)["supersedes_job_id"] == first


def test_transition_table_is_enforced(store: Store) -> None:
    job = _job(store)
    with pytest.raises(JobStateError):
        store.jobs.transition(job, JobState.DONE)
    assert JobState.DONE not in JOB_TRANSITIONS[JobState.QUEUED]


def test_lease_expiry_reclaims_a_dead_workers_job(store: Store) -> None:
    job = _job(store)
    assert store.jobs.claim("w1", lease_s=0.5)["id"] == job  # long enough for the next claim on a busy machine
    assert store.jobs.claim("w2", lease_s=60) is None
    time.sleep(0.6)
    again = store.jobs.claim("w2", lease_s=60)
    assert again["id"] == job and again["lease_owner"] == "w2" and again["attempts"] == 2
    states = [e["to_state"] for e in store.jobs.events(job)]
    assert states == ["QUEUED", "RUNNING", "QUEUED", "RUNNING"]


def test_deliveries_settle_the_job_and_replay_resends_only_dead(store: Store) -> None:
    job = _job(store, dests=["a", "b"])
    store.jobs.claim("w", 60)
    store.jobs.finish_encoding(job, [{"kind": "sr", "path": "/x"}], "0" * 64, 1, ["a", "b"])
    store.deliveries.record(job, "a", ok=True)
    assert store.jobs.get(job)["state"] == JobState.SENDING
    store.deliveries.record(job, "b", ok=False, error="refused", retry_at=time.time() - 1)
    assert [d["destination"] for d in store.deliveries.due()] == ["b"]
    store.deliveries.record(job, "b", ok=False, error="refused")  # dead letter
    row = store.jobs.get(job)
    assert row["state"] == JobState.FAILED and row["failed_stage"] == "send" and "b" in row["reason"]
    assert store.jobs.replay(job) == JobState.SENDING
    assert {d["destination"]: d["state"] for d in store.deliveries.of_job(job)} == {"a": "SENT", "b": "PENDING"}
    store.deliveries.record(job, "b", ok=True)
    row = store.jobs.get(job)
    assert row["state"] == JobState.DONE
    assert "send" in json.loads(row["stage_seconds"])


def test_failed_before_encoding_replays_as_rerun(store: Store) -> None:
    job = _job(store)
    store.jobs.claim("w", 60)
    store.jobs.fail(job, "infer", "BackendError: boom")
    assert store.jobs.get(job)["failed_stage"] == "infer"
    assert store.jobs.replay(job) == JobState.QUEUED
    assert store.jobs.claim("w", 60)["id"] == job


def test_startup_recovery(store: Store) -> None:
    a = store.associations.open("PACS", None)
    store.instances.record(_rec("1.1", assoc=a))
    job = _job(store)
    store.jobs.claim("w", 600)
    assert store.associations.close_stale() == 1
    assert store.jobs.requeue_orphans() == 1
    assert store.jobs.get(job)["state"] == JobState.QUEUED
    assert store.studies.receiving()[0]["open_associations"] == 0


def test_no_destination_job_is_done_with_results_kept(store: Store) -> None:
    job = _job(store, dests=[])
    store.jobs.claim("w", 60)
    store.jobs.finish_encoding(job, [{"kind": "sr", "path": "/x"}], "0" * 64, 0, [])
    assert store.jobs.get(job)["state"] == JobState.DONE
    assert store.deliveries.of_job(job) == []
    assert [e["to_state"] for e in store.jobs.events(job)][-2:] == ["SENDING", "DONE"]
