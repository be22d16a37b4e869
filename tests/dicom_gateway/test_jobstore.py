"""Job store: idempotent instances, study epochs, the transition table, leases, deliveries, replay."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dicom_gateway.errors import JobStateError
from dicom_gateway.states import JOB_TRANSITIONS, JobState, StudyState
from dicom_gateway.store.jobstore import InstanceRecord, JobStore


def _rec(sop: str, study: str = "1.2.3", assoc: int | None = None) -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_uid=study,
                          series_uid=study + ".1", transfer_syntax="1.2.840.10008.1.2.1", path=f"/x/{sop}.dcm",
                          size=10, calling_ae="PACS", association_id=assoc, modality="CT")


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite3")


def _job(store: JobStore, uids: list[str] | None = None, dests: list[str] | None = None) -> int:
    job_id, _ = store.create_job(study_uid="1.2.3", model="m", model_version="1", series_uid="1.2.3.1",
                                 input_uids=uids or ["1.1"], destinations=dests or ["a"], rule="r")
    return job_id


def test_duplicate_instance_is_idempotent(store: JobStore) -> None:
    assert store.record_instance(_rec("1.1")) is True
    assert store.record_instance(_rec("1.1")) is False
    assert len(store.study_instances("1.2.3")) == 1


def test_open_association_keeps_study_receiving_and_late_instance_reopens(store: JobStore) -> None:
    a = store.open_association("PACS", "127.0.0.1")
    store.record_instance(_rec("1.1", assoc=a))
    assert store.receiving_studies()[0]["open_associations"] == 1
    store.close_association(a)
    assert store.receiving_studies()[0]["open_associations"] == 0
    assert store.set_study_state("1.2.3", StudyState.READY, expect=StudyState.RECEIVING, epoch=1)
    store.record_instance(_rec("1.2"))  # late instance
    study = store.get_study("1.2.3")
    assert study["state"] == StudyState.RECEIVING and study["epoch"] == 2
    # a stale READY transition for epoch 1 must not win
    assert not store.set_study_state("1.2.3", StudyState.READY, expect=StudyState.RECEIVING, epoch=1)


def test_job_key_is_stable_and_late_series_supersedes(store: JobStore) -> None:
    first = _job(store, ["1.1"])
    assert store.create_job(study_uid="1.2.3", model="m", model_version="1", series_uid="1.2.3.1",
                            input_uids=["1.1"], destinations=["a"], rule="r") == (first, False)
    second = _job(store, ["1.1", "1.2"])
    assert second != first
    assert store.get_job(second)["supersedes_job_id"] == first


def test_transition_table_is_enforced(store: JobStore) -> None:
    job = _job(store)
    with pytest.raises(JobStateError):
        store.transition(job, JobState.DONE)
    assert JobState.DONE not in JOB_TRANSITIONS[JobState.QUEUED]


def test_lease_expiry_reclaims_a_dead_workers_job(store: JobStore) -> None:
    job = _job(store)
    assert store.claim_job("w1", lease_s=0.05)["id"] == job
    assert store.claim_job("w2", lease_s=60) is None
    time.sleep(0.1)
    again = store.claim_job("w2", lease_s=60)
    assert again["id"] == job and again["lease_owner"] == "w2" and again["attempts"] == 2
    states = [e["to_state"] for e in store.job_events(job)]
    assert states == ["QUEUED", "RUNNING", "QUEUED", "RUNNING"]


def test_deliveries_settle_the_job_and_replay_resends_only_dead(store: JobStore) -> None:
    job = _job(store, dests=["a", "b"])
    store.claim_job("w", 60)
    store.finish_encoding(job, [{"kind": "sr", "path": "/x"}], "0" * 64, 1, ["a", "b"])
    store.record_delivery(job, "a", ok=True)
    assert store.get_job(job)["state"] == JobState.SENDING
    store.record_delivery(job, "b", ok=False, error="refused", retry_at=time.time() - 1)
    assert [d["destination"] for d in store.due_deliveries()] == ["b"]
    store.record_delivery(job, "b", ok=False, error="refused")  # dead letter
    row = store.get_job(job)
    assert row["state"] == JobState.FAILED and row["failed_stage"] == "send" and "b" in row["reason"]
    assert store.replay(job) == JobState.SENDING
    assert {d["destination"]: d["state"] for d in store.deliveries(job)} == {"a": "SENT", "b": "PENDING"}
    store.record_delivery(job, "b", ok=True)
    row = store.get_job(job)
    assert row["state"] == JobState.DONE
    assert "send" in json.loads(row["stage_seconds"])


def test_failed_before_encoding_replays_as_rerun(store: JobStore) -> None:
    job = _job(store)
    store.claim_job("w", 60)
    store.fail(job, "infer", "BackendError: boom")
    assert store.get_job(job)["failed_stage"] == "infer"
    assert store.replay(job) == JobState.QUEUED
    assert store.claim_job("w", 60)["id"] == job


def test_startup_recovery(store: JobStore) -> None:
    a = store.open_association("PACS", None)
    store.record_instance(_rec("1.1", assoc=a))
    job = _job(store)
    store.claim_job("w", 600)
    assert store.close_stale_associations() == 1
    assert store.requeue_orphans() == 1
    assert store.get_job(job)["state"] == JobState.QUEUED
    assert store.receiving_studies()[0]["open_associations"] == 0


def test_no_destination_job_is_done_with_results_kept(store: JobStore) -> None:
    job = _job(store, dests=[])
    store.claim_job("w", 60)
    store.finish_encoding(job, [{"kind": "sr", "path": "/x"}], "0" * 64, 0, [])
    assert store.get_job(job)["state"] == JobState.DONE
    assert store.deliveries(job) == []
    assert [e["to_state"] for e in store.job_events(job)][-2:] == ["SENDING", "DONE"]
