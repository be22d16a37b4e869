"""The HTTP API over a real job store populated through its own methods (called with an admin token)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from dicom_gateway.api.app import create_app
from dicom_gateway.settings import Settings
from dicom_gateway.states import StudyState
from dicom_gateway.store import InstanceRecord, Store
from harness.gateway import new_api_token

STUDY = "1.2.826.0.1.3680043.10.1"
SERIES = f"{STUDY}.2"
SOPS = [f"{SERIES}.{i}" for i in range(1, 4)]


@dataclass
class Env:
    client: TestClient
    store: Store
    checks: dict[str, bool]
    failed_job: int
    queued_job: int


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    store = Store(tmp_path / "jobs.sqlite3", durable=False)
    assoc = store.associations.open("PACS", "127.0.0.1")
    for i, sop in enumerate(SOPS):
        store.instances.record(InstanceRecord(
            sop_instance_uid=sop, sop_class_uid=CTImageStorage, study_uid=STUDY, series_uid=SERIES,
            transfer_syntax=ExplicitVRLittleEndian, path=str(tmp_path / f"{i}.dcm"), size=100, calling_ae="PACS",
            association_id=assoc, modality="CT", body_part="CHEST", series_description="Lung 1mm",
            series_number=2, slice_thickness=1.0, orientation="axial", instance_number=i + 1, rows=512,
            columns=512))
    store.associations.close(assoc)
    assert store.studies.set_state(STUDY, StudyState.READY)
    store.studies.set_state(STUDY, StudyState.ROUTED, reason="rule spine: body part CHEST not in [SPINE]")
    failed, _ = store.jobs.create(study_uid=STUDY, model="lung_nodule_ct", model_version="1.0.0", series_uid=SERIES,
                                  input_uids=SOPS, destinations=["pacs", "archive"], rule="chest-ct-nodules")
    claimed = store.jobs.claim("worker-1", lease_s=60)
    assert claimed is not None and claimed["id"] == failed
    store.jobs.record_stages(failed, {"load": 0.5, "infer": 1.25})
    store.jobs.finish_encoding(failed, [{"kind": "SR", "sop_instance_uid": "2.25.1"}], "ab" * 32, 2,
                               ["pacs", "archive"])
    store.deliveries.record(failed, "pacs", ok=True)
    store.deliveries.record(failed, "archive", ok=False, error="association rejected")
    queued, _ = store.jobs.create(study_uid=STUDY, model="spine_vertebrae_ct", model_version="0.3.0",
                                  series_uid=SERIES, input_uids=SOPS[:2], destinations=["pacs"], rule="spine")
    checks = {"scp": True, "models": True, "store": True}
    token, entry = new_api_token("test-admin", "admin")
    app = create_app(Settings(data_dir=tmp_path, api_tokens=[entry]), store, lambda: dict(checks))
    with TestClient(app, base_url="http://127.0.0.1", headers={"Authorization": f"Bearer {token}"}) as client:
        yield Env(client, store, checks, failed, queued)
    store.close()


def test_health_and_readiness(env: Env) -> None:
    assert env.client.get("/healthz").json() == {"status": "ok"}
    r = env.client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"ready": True, "checks": env.checks}
    env.checks["models"] = False
    r = env.client.get("/readyz")
    assert r.status_code == 503
    assert r.json() == {"ready": False, "checks": {"scp": True, "models": False, "store": True}}


def test_readiness_probe_that_raises_is_not_ready(tmp_path: Path) -> None:
    def broken() -> dict[str, bool]:
        raise RuntimeError("probe failed")

    store = Store(tmp_path / "j.sqlite3", durable=False)
    client = TestClient(create_app(Settings(data_dir=tmp_path), store, broken), base_url="http://127.0.0.1")
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["ready"] is False
    store.close()


def test_list_jobs_and_filters(env: Env) -> None:
    jobs = env.client.get("/jobs").json()
    assert [j["id"] for j in jobs] == [env.queued_job, env.failed_job]  # newest first
    assert set(jobs[0]) == {"id", "study_uid", "model", "model_version", "state", "failed_stage", "reason",
                            "created_at", "updated_at", "findings"}
    (queued,) = env.client.get("/jobs", params={"state": "QUEUED"}).json()
    assert queued["model"] == "spine_vertebrae_ct" and queued["findings"] is None
    (failed,) = env.client.get("/jobs", params={"state": "FAILED", "study_uid": STUDY}).json()
    assert (failed["failed_stage"], failed["findings"]) == ("send", 2)
    assert "archive" in failed["reason"]
    assert env.client.get("/jobs", params={"study_uid": "9.9.9"}).json() == []
    assert len(env.client.get("/jobs", params={"limit": 1}).json()) == 1


def test_list_jobs_rejects_bad_parameters(env: Env) -> None:
    r = env.client.get("/jobs", params={"state": "SLEEPING"})
    assert r.status_code == 422
    assert all(s in r.text for s in ("QUEUED", "RUNNING", "ENCODED", "SENDING", "DONE", "FAILED"))
    assert env.client.get("/jobs", params={"limit": 0}).status_code == 422


def test_job_detail(env: Env) -> None:
    job = env.client.get(f"/jobs/{env.failed_job}").json()
    assert job["state"] == "FAILED" and job["series_uid"] == SERIES and job["rule"] == "chest-ct-nodules"
    assert job["inputs"] == sorted(SOPS) and job["destinations"] == ["pacs", "archive"]
    assert job["outputs"] == [{"kind": "SR", "sop_instance_uid": "2.25.1"}]
    assert job["weights_sha256"] == "ab" * 32 and job["stage_seconds"] == {"load": 0.5, "infer": 1.25}
    assert [(e["from_state"], e["to_state"]) for e in job["events"]] == [
        (None, "QUEUED"), ("QUEUED", "RUNNING"), ("RUNNING", "ENCODED"), ("ENCODED", "SENDING"),
        ("SENDING", "FAILED")]
    assert job["events"][-1]["stage"] == "send"
    entered = job["entered_at"]
    assert list(entered) == ["QUEUED", "RUNNING", "ENCODED", "SENDING", "FAILED"]
    assert entered["QUEUED"] <= entered["RUNNING"] <= entered["FAILED"]
    deliveries = {d["destination"]: d for d in job["deliveries"]}
    assert deliveries["pacs"]["state"] == "SENT" and deliveries["pacs"]["sent_at"] is not None
    assert deliveries["archive"]["state"] == "DEAD" and deliveries["archive"]["last_error"] == "association rejected"
    assert deliveries["archive"]["attempts"] == 1


def test_unknown_job_is_404(env: Env) -> None:
    r = env.client.get("/jobs/4242")
    assert r.status_code == 404 and r.json() == {"detail": "job 4242 not found"}
    assert env.client.get("/jobs/not-a-number").status_code == 422


def test_replay(env: Env) -> None:
    r = env.client.post(f"/jobs/{env.failed_job}/replay")
    assert r.status_code == 200 and r.json() == {"id": env.failed_job, "state": "SENDING"}
    job = env.client.get(f"/jobs/{env.failed_job}").json()
    assert {d["destination"]: d["state"] for d in job["deliveries"]} == {"pacs": "SENT", "archive": "PENDING"}
    assert job["events"][-1]["detail"] == "replay: resend" and job["events"][-1]["actor"] == "test-admin"
    assert job["events"][0]["actor"] is None  # the gateway's own transitions name no actor
    r = env.client.post(f"/jobs/{env.queued_job}/replay")
    assert r.status_code == 409 and "QUEUED" in r.json()["detail"]
    assert env.client.post("/jobs/4242/replay").status_code == 404


def test_study(env: Env) -> None:
    study = env.client.get(f"/studies/{STUDY}").json()
    assert (study["state"], study["epoch"], study["calling_ae"]) == ("ROUTED", 1, "PACS")
    assert study["reason"] == "rule spine: body part CHEST not in [SPINE]"
    (series,) = study["series"]
    assert series == {"series_uid": SERIES, "series_number": 2, "modality": "CT", "body_part": "CHEST",
                      "series_description": "Lung 1mm", "slice_thickness": 1.0, "orientation": "axial",
                      "n_instances": 3, "calling_ae": "PACS", "completeness": "unknown", "completeness_reason": None}
    assert {j["id"] for j in study["jobs"]} == {env.failed_job, env.queued_job}
    r = env.client.get("/studies/1.2.3.999")
    assert r.status_code == 404 and "1.2.3.999" in r.json()["detail"]


def test_openapi_served(env: Env) -> None:
    spec = env.client.get("/openapi.json").json()
    assert {"/healthz", "/readyz", "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/replay", "/jobs/{job_id}/rerun",
            "/studies/{study_uid}"} <= set(spec["paths"])
    assert env.client.get("/docs").status_code == 200 and env.client.get("/redoc").status_code == 200
    assert spec["paths"]["/jobs/{job_id}/replay"]["post"]["x-required-role"] == "operate"
    assert spec["paths"]["/jobs"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
