"""Crash-loop guard: a job that was RUNNING when its worker died counts a crash; at worker.max_crashes it
ends FAILED ("the worker died while running this job N times") instead of being requeued for ever."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicom_gateway.states import JobState, Stage
from dicom_gateway.store import Store
from dicom_gateway.store.jobs import CRASH_REASON
from harness.ct import write_chest_study
from harness.dcmtk import storescu
from harness.gateway import REPO, RunningGateway, start_gateway, write_config


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "jobs.sqlite3")


def _job(store: Store, n: int = 1) -> int:
    job_id, _ = store.jobs.create(study_uid=f"1.2.3.{n}", model="m", model_version="1", series_uid="1.2.3.1",
                                  input_uids=[f"1.1.{n}"], destinations=["a"], rule="r")
    return job_id


def _die_while_running(store: Store, job_id: int, max_crashes: int) -> tuple[list[int], list[int]]:
    """A worker claims the job, the process dies, the next start-up recovers."""
    claimed = store.jobs.claim("w", 600, max_crashes)
    assert claimed is not None and claimed["id"] == job_id
    return store.jobs.recover_orphans(max_crashes)


def test_job_fails_after_max_crashes_at_start_up(store: Store) -> None:
    job = _job(store)
    for n in (1, 2):
        assert _die_while_running(store, job, 3) == ([job], [])
        row = store.jobs.get(job)
        assert row["state"] == JobState.QUEUED and row["crashes"] == n
    assert _die_while_running(store, job, 3) == ([], [job])
    row = store.jobs.get(job)
    assert row["state"] == JobState.FAILED
    assert row["reason"] == CRASH_REASON.format(n=3) == "the worker died while running this job 3 times"
    assert row["failed_stage"] == Stage.INFER  # the model's stages had not finished
    details = [e["detail"] for e in store.jobs.events(job)]
    assert sum("requeued at start-up" in (d or "") for d in details) == 2
    assert store.jobs.claim("w", 600, 3) is None  # not run a fourth time


def test_crash_after_the_model_ran_fails_at_encode(store: Store) -> None:
    job = _job(store)
    store.jobs.claim("w", 600, 1)
    store.jobs.record_stages(job, {"load": 0.1, "preprocess": 0.1, "infer": 0.5, "postprocess": 0.1}, "w")
    assert store.jobs.recover_orphans(1) == ([], [job])
    assert store.jobs.get(job)["failed_stage"] == Stage.ENCODE


def test_crashes_count_only_consecutive_deaths(store: Store) -> None:
    job = _job(store)
    assert _die_while_running(store, job, 2) == ([job], [])
    store.jobs.claim("w", 600, 2)
    store.jobs.finish_encoding(job, [{"kind": "sr", "path": "/x"}], "0" * 64, 1, ["a"], worker_id="w")
    row = store.jobs.get(job)
    assert row["state"] == JobState.ENCODED and row["crashes"] == 0

    other = _job(store, 2)
    assert _die_while_running(store, other, 2) == ([other], [])
    store.jobs.claim("w", 600, 2)
    store.jobs.fail(other, Stage.LOAD, "VolumeError: irregular slice spacing", worker_id="w")
    assert store.jobs.get(other)["crashes"] == 0


def test_replay_of_a_crash_looped_job_starts_a_fresh_count(store: Store) -> None:
    job = _job(store)
    assert _die_while_running(store, job, 1) == ([], [job])
    assert store.jobs.get(job)["crashes"] == 1
    assert store.jobs.replay(job) == JobState.QUEUED
    assert store.jobs.get(job)["crashes"] == 0
    assert _die_while_running(store, job, 2) == ([job], [])  # one crash of two, not the second


def test_expired_lease_is_a_crash_and_the_guard_applies_in_claim(store: Store) -> None:
    job = _job(store)
    nxt = _job(store, 2)
    assert store.jobs.claim("w1", 0.05, 2)["id"] == job
    time.sleep(0.1)
    reclaimed = store.jobs.claim("w2", 0.05, 2)  # w1 died: reclaimed, crash 1
    assert reclaimed["id"] == job and reclaimed["crashes"] == 1 and reclaimed["lease_owner"] == "w2"
    time.sleep(0.1)
    claimed = store.jobs.claim("w3", 60, 2)  # w2 died too: crash 2 = max -> FAILED; the next job is claimed
    assert claimed["id"] == nxt
    row = store.jobs.get(job)
    assert row["state"] == JobState.FAILED and row["reason"] == CRASH_REASON.format(n=2)


# -- a real `dxgate serve` SIGKILLed while it runs a job, max_crashes times ----------------------------------
MAX_CRASHES = 2


def _wait_running(gw: RunningGateway, timeout_s: float = 240.0) -> dict:
    """The first job seen RUNNING (polled fast, so the kill lands while the model runs)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = gw.api("/jobs?state=RUNNING")
        if running:
            return running[0]
        assert gw.proc.poll() is None, gw.log()[-3000:]
        time.sleep(0.02)
    raise AssertionError(f"no job RUNNING in {timeout_s}s: {gw.api('/jobs')}\n{gw.log()[-3000:]}")


@pytest.mark.integration
@pytest.mark.slow
def test_a_job_that_kills_the_gateway_ends_failed_and_the_next_study_runs(tmp_path: Path,
                                                                          request: pytest.FixtureRequest) -> None:
    models = REPO / "models"
    if not (models / "lung_nodule_ct" / "metadata.json").is_file():
        models = request.getfixturevalue("smoke_models_dir")
    # one inference thread keeps the model running for seconds: long enough to be killed while RUNNING
    cfg = write_config(tmp_path, models, worker={"max_crashes": MAX_CRASHES},
                       backends={"lung_nodule_ct": {"intra_op_threads": 1}})
    study = write_chest_study(tmp_path / "crashing", slices=100, rows=512, seed=3)
    job_id = None
    for crash in range(MAX_CRASHES):
        gw = start_gateway(cfg)
        try:
            if crash == 0:
                storescu(study, gw.dicom_port, gw.ae_title)
            running = _wait_running(gw)
            assert job_id in (None, running["id"])
            job_id = running["id"]
        finally:
            gw.kill()  # the worker "dies" while running the job (as an OOM kill or a segfault would)
        store = Store(gw.data_dir / "jobs.sqlite3")
        assert store.jobs.get(job_id)["state"] == JobState.RUNNING  # it died mid-job, not after
        store.close()

    gw = start_gateway(cfg)
    try:
        job = gw.api(f"/jobs/{job_id}")
        assert job["state"] == "FAILED", job
        assert job["reason"] == f"the worker died while running this job {MAX_CRASHES} times"
        assert job["failed_stage"] in (Stage.INFER, Stage.ENCODE)
        details = [e.get("detail") or "" for e in job["events"]]
        assert sum("requeued at start-up" in d for d in details) == MAX_CRASHES - 1
        assert "the worker died while running it" in gw.log()

        # the gateway goes on: the next study is processed normally
        storescu(write_chest_study(tmp_path / "next", slices=40, rows=256, seed=5), gw.dicom_port, gw.ae_title)
        done = gw.wait_job_states({"DONE"}, timeout=240)
        assert job_id not in [j["id"] for j in done] and gw.api(f"/jobs/{job_id}")["state"] == "FAILED"
    finally:
        gw.stop()
