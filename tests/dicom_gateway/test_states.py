"""The state tables and the Stage enum, and that the store enforces the study and delivery tables."""

from __future__ import annotations

import importlib
import pkgutil
import time
from pathlib import Path

import pytest

import inference
from dicom_gateway.errors import DeliveryStateError, StateError, StudyStateError
from dicom_gateway.states import (
    DELIVERY_TRANSITIONS,
    JOB_STAGES,
    JOB_TRANSITIONS,
    STUDY_STAGES,
    STUDY_TRANSITIONS,
    DeliveryState,
    JobState,
    Stage,
    StudyState,
)
from dicom_gateway.store import InstanceRecord, Store
from inference.errors import InferenceError


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_all_subclasses(sub)]
    return out


def test_every_inference_error_names_a_stage() -> None:
    for mod in pkgutil.walk_packages(inference.__path__, "inference."):
        importlib.import_module(mod.name)
    errors = [InferenceError, *_all_subclasses(InferenceError)]
    assert len(errors) >= 8
    for cls in errors:
        assert isinstance(cls.stage, str), cls
        assert Stage(cls.stage) in JOB_STAGES, f"{cls.__module__}.{cls.__name__}.stage = {cls.stage!r}"


def test_stage_values_are_the_stored_strings() -> None:
    assert Stage.LOAD_MODEL == "load_model" and Stage.SEND == "send" and f"{Stage.INFER}" == "infer"
    assert set(JOB_STAGES) | STUDY_STAGES == set(Stage) and not set(JOB_STAGES) & STUDY_STAGES
    assert JOB_STAGES[0] == Stage.LOAD_MODEL and JOB_STAGES[-1] == Stage.SEND


def test_every_state_has_a_row_in_its_table() -> None:
    assert set(STUDY_TRANSITIONS) == set(StudyState)
    assert set(JOB_TRANSITIONS) == set(JobState)
    assert set(DELIVERY_TRANSITIONS) == set(DeliveryState)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "jobs.sqlite3", durable=False)


def _receive(store: Store, sop: str, study: str = "1.2.3") -> None:
    store.instances.record(InstanceRecord(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                          study_uid=study, series_uid=f"{study}.1", transfer_syntax=None,
                                          path=f"/spool/{sop}.dcm", size=1, calling_ae="PACS", association_id=None))


def test_study_changes_outside_the_table_are_refused(store: Store) -> None:
    _receive(store, "1.1")
    with pytest.raises(StudyStateError, match="RECEIVING -> ROUTED"):
        store.studies.set_state("1.2.3", StudyState.ROUTED)
    assert store.studies.get("1.2.3")["state"] == StudyState.RECEIVING  # unchanged
    assert store.studies.set_state("1.2.3", StudyState.READY)
    with pytest.raises(StateError):
        store.studies.set_state("1.2.3", StudyState.READY)  # READY -> READY is not a change the table lists
    assert store.studies.set_state("1.2.3", StudyState.UNROUTED, reason="no rule")
    with pytest.raises(StudyStateError, match="UNROUTED -> ROUTED"):
        store.studies.set_state("1.2.3", StudyState.ROUTED)
    _receive(store, "1.2")  # UNROUTED -> RECEIVING is allowed: a late instance, a new epoch
    assert (store.studies.get("1.2.3")["state"], store.studies.get("1.2.3")["epoch"]) == ("RECEIVING", 2)
    assert not store.studies.set_state("9.9", StudyState.READY)  # no such study: nothing to move


def _encoded(store: Store, dests: list[str]) -> int:
    job_id, _ = store.jobs.create(study_uid="1.2.3", model="m", model_version="1", series_uid="1.2.3.1",
                                  input_uids=["1.1"], destinations=dests, rule="r")
    store.jobs.claim("w", 60)
    store.jobs.finish_encoding(job_id, [{"kind": "sr", "path": "/x"}], "0" * 64, 1, dests)
    return job_id


def test_delivery_changes_outside_the_table_are_refused(store: Store) -> None:
    job = _encoded(store, ["a", "b"])
    store.deliveries.record(job, "a", ok=True)
    with pytest.raises(DeliveryStateError, match="SENT -> DEAD"):
        store.deliveries.record(job, "a", ok=False, error="late failure")  # a SENT delivery stays SENT
    with pytest.raises(DeliveryStateError, match="no delivery"):
        store.deliveries.record(job, "nowhere", ok=True)
    rows = {d["destination"]: (d["state"], d["attempts"]) for d in store.deliveries.of_job(job)}
    assert rows == {"a": ("SENT", 1), "b": ("PENDING", 0)}  # the refused changes were rolled back
    store.deliveries.record(job, "b", ok=False, error="refused", retry_at=time.time() + 60)  # PENDING -> PENDING
    store.deliveries.record(job, "b", ok=False, error="refused")  # PENDING -> DEAD: the job fails at send
    assert store.jobs.get(job)["failed_stage"] == Stage.SEND
    with pytest.raises(DeliveryStateError, match="DEAD -> SENT"):
        store.deliveries.record(job, "b", ok=True)
    store.jobs.replay(job)  # DEAD -> PENDING
    store.deliveries.record(job, "b", ok=True)
    assert store.jobs.get(job)["state"] == JobState.DONE
    store.jobs.replay(job)  # a DONE job resends everything: SENT -> PENDING
    assert {d["state"] for d in store.deliveries.of_job(job)} == {DeliveryState.PENDING}
