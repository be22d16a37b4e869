"""Who may call the HTTP API: bearer tokens and roles, the Host check, no CORS, the generated local token.

The app is called through starlette's TestClient over a real job store; the last tests start a real
`dxgate serve` and call it over loopback.
"""

from __future__ import annotations

import socket
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from dicom_gateway.api.app import create_app
from dicom_gateway.api.auth import TokenBook, authorizer, host_of, local_admin_token, token_sha256
from dicom_gateway.errors import ConfigError
from dicom_gateway.settings import Settings
from dicom_gateway.settings_security import ApiToken
from dicom_gateway.states import Stage
from dicom_gateway.store import Store
from harness.gateway import REPO, api_get, new_api_token, start_gateway, write_config
from harness.system import free_port

STUDY = "1.2.826.0.1.3680043.10.7"
SOPS = [f"{STUDY}.2.{i}" for i in range(1, 4)]


@dataclass
class Env:
    client: TestClient
    app: FastAPI
    store: Store
    tokens: dict[str, str]  # role -> token
    failed_job: int
    done_job: int

    def as_(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    store = Store(tmp_path / "jobs.sqlite3", durable=False)
    failed, _ = store.jobs.create(study_uid=STUDY, model="lung_nodule_ct", model_version="1.0.0",
                                  series_uid=f"{STUDY}.2", input_uids=SOPS, destinations=["pacs"], rule="chest")
    assert store.jobs.claim("w1", lease_s=60) is not None
    store.jobs.fail(failed, Stage.INFER, "BackendError: out of memory")
    done, _ = store.jobs.create(study_uid=STUDY, model="spine_vertebrae_ct", model_version="1.0.0",
                                series_uid=f"{STUDY}.2", input_uids=SOPS[:2], destinations=["pacs"], rule="spine")
    assert store.jobs.claim("w1", lease_s=60) is not None
    store.jobs.finish_encoding(done, [{"kind": "SR", "sop_instance_uid": "2.25.7"}], "cd" * 32, 1, ["pacs"])
    store.deliveries.record(done, "pacs", ok=True)
    assert store.jobs.get(done)["state"] == "DONE"
    tokens, entries = {}, []
    for role in ("read", "operate", "admin"):
        tokens[role], entry = new_api_token(f"{role}-token", role)
        entries.append(entry)
    settings = Settings(data_dir=tmp_path, api_tokens=entries, http_allowed_hosts=["localhost", "dxgate.example.org"])
    app = create_app(settings, store, lambda: {"store": True})
    with TestClient(app, base_url="http://localhost") as client:
        yield Env(client, app, store, tokens, failed, done)
    store.close()


def test_missing_wrong_and_unknown_tokens_get_401(env: Env) -> None:
    other, _ = new_api_token()
    for headers in ({}, {"Authorization": f"Bearer {other}"}, {"Authorization": f"Basic {env.tokens['admin']}"},
                    {"Authorization": "Bearer"}, {"Authorization": f"Bearer {env.tokens['admin']}x"},
                    {"Authorization": env.tokens["admin"]}):
        for method, path in (("GET", "/jobs"), ("GET", f"/jobs/{env.failed_job}"), ("GET", f"/studies/{STUDY}"),
                             ("POST", f"/jobs/{env.failed_job}/replay"), ("POST", f"/jobs/{env.done_job}/rerun")):
            r = env.client.request(method, path, headers=headers)
            assert r.status_code == 401, (headers, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    assert env.store.jobs.get(env.failed_job)["state"] == "FAILED"  # nothing was replayed


def test_read_token_reads_but_may_not_replay_or_rerun(env: Env) -> None:
    assert [j["id"] for j in env.client.get("/jobs", headers=env.as_("read")).json()] == [env.done_job, env.failed_job]
    assert env.client.get(f"/studies/{STUDY}", headers=env.as_("read")).status_code == 404  # past auth: no study
    for path in (f"/jobs/{env.failed_job}/replay", f"/jobs/{env.done_job}/rerun"):
        r = env.client.post(path, headers=env.as_("read"))
        assert r.status_code == 403 and "read-token" in r.json()["detail"] and "operate" in r.json()["detail"]
    assert env.store.jobs.get(env.failed_job)["state"] == "FAILED"
    assert env.store.jobs.get(env.done_job)["state"] == "DONE"


def test_operate_replays_and_reruns_recorded_with_the_tokens_name(env: Env) -> None:
    r = env.client.post(f"/jobs/{env.failed_job}/replay", headers=env.as_("operate"))
    assert r.status_code == 200 and r.json() == {"id": env.failed_job, "state": "QUEUED"}
    event = env.client.get(f"/jobs/{env.failed_job}", headers=env.as_("read")).json()["events"][-1]
    assert (event["to_state"], event["detail"], event["actor"]) == ("QUEUED", "replay: rerun", "operate-token")

    r = env.client.post(f"/jobs/{env.done_job}/rerun", headers=env.as_("admin"))
    assert r.status_code == 200 and r.json() == {"id": env.done_job, "state": "QUEUED"}
    job = env.client.get(f"/jobs/{env.done_job}", headers=env.as_("read")).json()
    assert job["outputs"] == [] and job["deliveries"] == []  # run afresh, although it had results
    assert (job["events"][-1]["detail"], job["events"][-1]["actor"]) == ("rerun", "admin-token")
    r = env.client.post(f"/jobs/{env.done_job}/rerun", headers=env.as_("operate"))
    assert r.status_code == 409 and "QUEUED" in r.json()["detail"]
    assert env.client.post("/jobs/4242/rerun", headers=env.as_("operate")).status_code == 404


def test_every_route_but_health_needs_a_token(env: Env) -> None:
    """Walks every operation of the OpenAPI document, so that a router added without the authorizer fails here."""
    operations = [(method.upper(), path) for path, item in env.app.openapi()["paths"].items() for method in item]
    operations += [("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json")]
    assert ("POST", "/jobs/{job_id}/rerun") in operations and ("GET", "/studies/{study_uid}") in operations
    for method, path in operations:
        r = env.client.request(method, path.replace("{job_id}", str(env.failed_job)).replace("{study_uid}", STUDY))
        expected = 200 if path in ("/healthz", "/readyz") else 401
        assert r.status_code == expected, (method, path, r.status_code)


def test_write_endpoints_need_admin_unless_they_declare_a_role() -> None:
    token, entry = new_api_token("ops", "operate")
    app = FastAPI()
    from fastapi import Depends

    @app.post("/purge", dependencies=[Depends(authorizer(TokenBook([ApiToken(**entry)])))])
    def purge() -> dict[str, bool]:
        return {"purged": True}

    r = TestClient(app).post("/purge", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403 and "admin" in r.json()["detail"]


def test_docs_and_openapi_need_a_token_health_does_not(env: Env) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert env.client.get(path).status_code == 401, path
        assert env.client.get(path, headers=env.as_("read")).status_code == 200, path
    assert "/jobs/{job_id}/rerun" in env.client.get("/openapi.json", headers=env.as_("read")).json()["paths"]
    assert env.client.get("/healthz").json() == {"status": "ok"}
    assert env.client.get("/readyz").json() == {"ready": True, "checks": {"store": True}}


def test_host_outside_the_allowed_hosts_gets_400(env: Env) -> None:
    for host in ("evil.example", "dxgate.example.org.evil.example", "10.0.0.9:8080", ""):
        r = env.client.get("/jobs", headers={**env.as_("admin"), "Host": host})
        assert r.status_code == 400, host
        assert "http_allowed_hosts" in r.json()["detail"]
    for host in ("localhost:8080", "DXGATE.example.org", "127.0.0.1"):  # 127.0.0.1: the http_bind_address
        assert env.client.get("/jobs", headers={**env.as_("read"), "Host": host}).status_code == 200, host
    # orchestrators probe health by IP address: those two answer any Host
    assert env.client.get("/healthz", headers={"Host": "10.0.0.9:8080"}).status_code == 200


def test_host_header_forms() -> None:
    assert host_of("[::1]:8080") == "::1" and host_of("Example.ORG:80") == "example.org"
    assert host_of("127.0.0.1") == "127.0.0.1" and host_of("::1") == "::1"


def test_no_cors_headers(env: Env) -> None:
    origin = {"Origin": "http://evil.example"}
    preflight = env.client.options("/jobs", headers={**origin, "Access-Control-Request-Method": "GET",
                                                     "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code >= 400
    answered = env.client.get("/jobs", headers={**origin, **env.as_("read")})
    assert answered.status_code == 200
    for r in (preflight, answered, env.client.get("/healthz", headers=origin)):
        assert not [h for h in r.headers if h.lower().startswith("access-control-")], r.headers


def test_local_admin_token_file(tmp_path: Path) -> None:
    token, created = local_admin_token(tmp_path / "var")
    path = tmp_path / "var" / "api-token"
    assert created and len(token) >= 40 and path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert local_admin_token(tmp_path / "var") == (token, False)
    assert [p.name for p in path.parent.iterdir()] == ["api-token"]  # no temporary file left
    assert TokenBook([ApiToken(name="a", role="admin", sha256=token_sha256(token))]).identify(token).name == "a"
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="api-token"):
        local_admin_token(tmp_path / "var")


# -- a real `dxgate serve` --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models_dir(request: pytest.FixtureRequest) -> Path:
    """The shipped models/ when one is installed (readiness needs a model), else a smoke model."""
    if any((REPO / "models").glob("*/metadata.json")):
        return REPO / "models"
    return request.getfixturevalue("smoke_models_dir")


def _refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return False
    except OSError:
        return True


@pytest.mark.integration
def test_serve_generates_the_token_once_and_binds_the_api_apart(tmp_path: Path, models_dir: Path) -> None:
    """No api_tokens: the first start writes var/api-token (0600) and prints it; a restart reads it silently.
    DICOM listens on 127.0.0.2 and the API on http_bind_address 127.0.0.1, each on its own address only."""
    http_port, dicom_port = free_port(), free_port()
    cfg = write_config(tmp_path, models_dir, api_tokens=None, bind_address="127.0.0.2", dicom_port=dicom_port,
                       http_port=http_port, http_bind_address="127.0.0.1")
    token_file = tmp_path / "var" / "api-token"
    logs = []
    for _ in ("first start", "restart"):
        gw = start_gateway(cfg)
        try:
            assert token_file.is_file() and stat.S_IMODE(token_file.stat().st_mode) == 0o600
            token = token_file.read_text().strip()
            assert gw.token == token
            assert api_get(gw.http_port, "/jobs", token) == []
            with pytest.raises(urllib.error.HTTPError) as refused:
                api_get(gw.http_port, "/jobs")
            assert refused.value.code == 401
            assert _refused("127.0.0.2", http_port), "the API answers on the DICOM bind address"
            assert _refused("127.0.0.1", dicom_port), "the SCP answers on the API's bind address"
            assert not _refused("127.0.0.2", dicom_port)
        finally:
            gw.stop()
        logs.append(gw.log())
    first, second = logs
    assert first.count(token) == 1 and f"API token (admin) written to {token_file}" in first
    assert token not in second, "the token was printed again at the second start"


@pytest.mark.integration
def test_configured_tokens_replace_the_token_file(tmp_path: Path, models_dir: Path) -> None:
    token, entry = new_api_token("ris", "read")
    gw = start_gateway(write_config(tmp_path, models_dir, api_tokens=[entry]))
    try:
        assert not (tmp_path / "var" / "api-token").exists()
        req = urllib.request.Request(f"http://127.0.0.1:{gw.http_port}/jobs/1/replay", method="POST",
                                     headers={"Authorization": f"Bearer {token}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == 403
        assert api_get(gw.http_port, "/jobs", token) == []
    finally:
        gw.stop()
