"""Leases: renewed while a job runs; every write a worker makes checks it still holds the lease, and a
worker that lost it (another reclaimed the job) drops its results without touching the winner's job."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_gateway.errors import LeaseLostError
from dicom_gateway.server import load_models
from dicom_gateway.settings import Destination, Settings, WorkerSettings
from dicom_gateway.states import JobState, Stage
from dicom_gateway.store import Store
from dicom_gateway.work.worker import LoadedModel, Worker
from harness.ct import build_ct_series
from tests.dicom_gateway.stores import ingest

LEASE_S = 0.5


@pytest.fixture
def line(tmp_path: Path, smoke_models_dir: Path) -> tuple[Settings, Store, dict[str, LoadedModel], int]:
    """Settings with a 0.5 s lease, a store, the served models and one QUEUED job over a small CT series."""
    settings = Settings(data_dir=tmp_path / "var", models_dir=smoke_models_dir,
                        destinations=[Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=1)],
                        worker=WorkerSettings(lease_s=LEASE_S, max_crashes=3))
    store = Store(settings.db_path)
    spool = tmp_path / "spool"
    spool.mkdir()
    datasets = build_ct_series(20)
    ingest(store, spool, datasets)
    job_id, _ = store.jobs.create(study_uid=datasets[0].StudyInstanceUID, model="lung_nodule_ct", model_version="1",
                                  series_uid=datasets[0].SeriesInstanceUID,
                                  input_uids=[str(d.SOPInstanceUID) for d in datasets], destinations=["pacs"],
                                  rule="r")
    return settings, store, load_models(settings), job_id


class SlowRunner:
    """The model's runner behind a backend that takes `seconds` longer (a slow GPU, a big series)."""

    def __init__(self, runner: Any, seconds: float) -> None:
        self.runner, self.seconds = runner, seconds

    def run(self, paths: list[Path]) -> Any:
        time.sleep(self.seconds)
        return self.runner.run(paths)


class StallingWorker(Worker):
    """A worker that stops after writing its results, before recording them (a stalled process)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stalled, self.resume = threading.Event(), threading.Event()
        self.written: list[Path] = []

    def _encode_and_validate(self, job: Any, model: Any, result: Any, paths: Any,
                             written: list[Path]) -> list[dict[str, Any]]:
        outputs = super()._encode_and_validate(job, model, result, paths, written)
        self.written = list(written)
        self.stalled.set()
        assert self.resume.wait(60)
        return outputs


def test_lost_lease_drops_the_late_results_and_leaves_the_winners_job(line, caplog) -> None:  # noqa: ANN001
    settings, store, models, job_id = line
    first = StallingWorker(settings, store, models, worker_id="first")
    second = Worker(settings, store, models, worker_id="second")
    job = store.jobs.claim("first", LEASE_S, 3)  # claimed without a heartbeat: a process that stalls
    runner = threading.Thread(target=first.run_job, args=(job,))
    runner.start()
    try:
        assert first.stalled.wait(120), "the first worker never reached its results"
        while time.time() <= store.jobs.get(job_id)["lease_expires_at"]:
            time.sleep(0.05)
        assert second.run_once()  # reclaims the expired lease and runs the job to ENCODED
    finally:
        first.resume.set()
        runner.join(60)
    won = store.jobs.get(job_id)
    assert won["state"] == JobState.ENCODED, (won["failed_stage"], won["reason"])
    outputs = json.loads(won["outputs"])
    assert outputs and all(Path(o["path"]).is_file() for o in outputs)
    # the first worker's results: written, never recorded, removed once its write was refused
    assert first.written and not any(p.is_file() for p in first.written)
    assert {o["path"] for o in outputs}.isdisjoint({str(p) for p in first.written})
    assert any("results dropped" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    details = [e["detail"] or "" for e in store.jobs.events(job_id)]
    assert any("lease expired; reclaimed" in d for d in details)
    assert won["crashes"] == 0  # the winner left RUNNING normally

    # the store refuses every write of the worker that lost the lease, whatever the job's state
    with pytest.raises(LeaseLostError):
        store.jobs.finish_encoding(job_id, [], "0" * 64, 0, [], worker_id="first")
    with pytest.raises(LeaseLostError):
        store.jobs.fail(job_id, Stage.INFER, "late failure", worker_id="first")
    with pytest.raises(LeaseLostError):
        store.jobs.record_stages(job_id, {"infer": 1.0}, worker_id="first")
    assert store.jobs.get(job_id)["state"] == JobState.ENCODED


def test_a_late_failure_does_not_fail_the_winners_job(line) -> None:  # noqa: ANN001
    settings, store, _models, job_id = line
    store.jobs.claim("first", 0.05, 3)
    time.sleep(0.1)
    assert store.jobs.claim("second", 60, 3)["lease_owner"] == "second"
    with pytest.raises(LeaseLostError):
        store.jobs.fail(job_id, Stage.INFER, "BackendError: out of memory", worker_id="first")
    row = store.jobs.get(job_id)
    assert row["state"] == JobState.RUNNING and row["lease_owner"] == "second" and row["reason"] is None
    assert not store.jobs.renew(job_id, "first", 60)
    assert store.jobs.renew(job_id, "second", 60)


def test_renewed_lease_outlives_a_job_three_times_longer(line) -> None:  # noqa: ANN001
    settings, store, models, job_id = line
    loaded = models["lung_nodule_ct"]
    slow = {"lung_nodule_ct": LoadedModel(model=loaded.model, runner=SlowRunner(loaded.runner, 3 * LEASE_S))}
    first = Worker(settings, store, slow, worker_id="first")
    second = Worker(settings, store, models, worker_id="second")
    done = threading.Event()
    runner = threading.Thread(target=lambda: (first.run_once(), done.set()))
    runner.start()
    claimed_by_second = False
    try:
        while not done.wait(0.05):
            claimed_by_second = claimed_by_second or second.run_once()
    finally:
        runner.join(120)
    row = store.jobs.get(job_id)
    assert not claimed_by_second
    assert row["state"] == JobState.ENCODED, (row["failed_stage"], row["reason"])
    assert row["attempts"] == 1 and row["crashes"] == 0
    assert not any("reclaimed" in (e["detail"] or "") for e in store.jobs.events(job_id))
    assert json.loads(row["stage_seconds"])["load"] >= 0
    assert all(pydicom.dcmread(o["path"]).SOPInstanceUID == o["sop_instance_uid"] for o in json.loads(row["outputs"]))
