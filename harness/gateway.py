"""`python -m dxgate serve --config FILE` as a real subprocess on free loopback ports; its API; its stop.

`write_config` configures an admin API token of its own (kept beside the config as `<name>.token`), which
`RunningGateway.api` sends; a config with its own `api_tokens` (or none, as `api_tokens=None` asks) is used
with the token file the gateway generates in its data_dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydicom.uid import Comprehensive3DSRStorage, GrayscaleSoftcopyPresentationStateStorage, SegmentationStorage

from harness.dcmtk import wait_for_echo
from harness.system import StartError, free_port, log_tail, stop_process

REPO = Path(__file__).resolve().parents[1]

# What the gateway sends back (PS3.4 B.5).
SR_CLASS = Comprehensive3DSRStorage
SEG_CLASS = SegmentationStorage
GSPS_CLASS = GrayscaleSoftcopyPresentationStateStorage

DEFAULT_RULES = [
    {"name": "chest-ct-nodules", "match": {"modality": ["CT"], "body_part": ["CHEST"]},
     "models": ["lung_nodule_ct"]},
    {"name": "spine", "match": {"modality": ["CT"], "body_part": ["SPINE"]}, "models": ["spine_vertebrae_ct"]},
]


def new_api_token(name: str = "harness", role: str = "admin") -> tuple[str, dict[str, str]]:
    """A fresh bearer token and its `api_tokens` entry ({name, role, sha256})."""
    token = secrets.token_urlsafe(32)
    return token, {"name": name, "role": role, "sha256": hashlib.sha256(token.encode()).hexdigest()}


def api_request(http_port: int, path: str, token: str | None, method: str = "GET",
                timeout_s: float = 10.0) -> urllib.request.Request:
    """A request to the gateway's API on 127.0.0.1, with `Authorization: Bearer <token>` when a token is given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return urllib.request.Request(f"http://127.0.0.1:{http_port}{path}", method=method, headers=headers)


def api_get(http_port: int, path: str, token: str | None = None, timeout_s: float = 10.0) -> Any:
    """GET a JSON body from the gateway's API on 127.0.0.1 (urllib raises on 4xx/5xx)."""
    with urllib.request.urlopen(api_request(http_port, path, token), timeout=timeout_s) as r:
        return json.loads(r.read())


def token_path(config: Path) -> Path:
    """Where write_config keeps the token it configured: beside the config, `<name>.token`."""
    return config.with_suffix(".token")


@dataclass
class RunningGateway:
    """A `dxgate serve` process this harness started."""

    proc: subprocess.Popen
    config: Path
    data_dir: Path
    dicom_port: int
    http_port: int
    log_path: Path
    ae_title: str = "DXGATE"
    token: str | None = None
    """The bearer token `api` sends: write_config's, else the one the gateway generated in its data_dir."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def api(self, path: str) -> Any:
        return api_get(self.http_port, path, self.token)

    def log(self) -> str:
        return log_tail(self.log_path, chars=None)

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as in a power cut of the process."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), SIGKILL after 20 s."""
        stop_process(self.proc, timeout_s=20)

    def wait_job_states(self, states: set[str], timeout: float = 120.0, count: int = 1) -> list[dict]:
        """Wait until at least `count` jobs are in one of `states`; fail with the server log otherwise."""
        deadline = time.monotonic() + timeout
        jobs: list[dict] = []
        while time.monotonic() < deadline:
            jobs = self.api("/jobs?limit=100")
            done = [j for j in jobs if j["state"] in states]
            if len(done) >= count:
                return done
            if self.proc.poll() is not None:
                raise AssertionError(f"dxgate exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.3)
        raise AssertionError(f"jobs did not reach {states} in {timeout}s: {jobs}\n{self.log()[-4000:]}")


def write_config(tmp: Path, models_dir: Path, *, destinations: list[dict] | None = None,
                 dicom_port: int | None = None, http_port: int | None = None, **extra: Any) -> Path:
    """`<tmp>/dxgate.yaml` on free loopback ports, data in `<tmp>/var`; returns its path.

    By default chest CT routes to lung_nodule_ct and spine CT to spine_vertebrae_ct (`rules=[]` for none),
    a study is complete after 1 s of quiet, and the sender retries quickly; `extra` overrides any setting.
    Unless `extra` names `api_tokens`, one admin token is configured and kept in `token_path(config)`;
    `api_tokens=None` leaves them out (the gateway then generates `<data_dir>/api-token`).
    """
    token, entry = new_api_token()
    cfg = {
        "ae_title": "DXGATE",
        "bind_address": "127.0.0.1",
        "dicom_port": dicom_port or free_port(),
        "http_port": http_port or free_port(),
        "data_dir": str(tmp / "var"),
        "models_dir": str(models_dir),
        "quiet_seconds": 1.0,
        "min_free_disk_mb": 1,
        "fsync": True,
        "destinations": destinations or [],
        "rules": DEFAULT_RULES,
        "sender": {"max_attempts": 8, "backoff_initial_s": 0.5, "backoff_max_s": 2.0, "timeout_s": 10},
        "log_format": "json",
        "api_tokens": [entry],
        **extra,
    }
    if cfg["api_tokens"] is None:
        del cfg["api_tokens"]
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "dxgate.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    token_file = token_path(path)
    if cfg.get("api_tokens") == [entry]:
        token_file.write_text(token + "\n", encoding="utf-8")
    else:
        token_file.unlink(missing_ok=True)
    return path


def token_for(config: Path, data_dir: Path) -> str | None:
    """The token to call a gateway of this config with: write_config's, else the gateway's generated one."""
    for path in (token_path(config), data_dir / "api-token"):
        if path.is_file():
            return path.read_text(encoding="utf-8").strip()
    return None


def _answers(gw: RunningGateway, path: str) -> bool:
    try:
        body = gw.api(path)
    except (urllib.error.URLError, ConnectionError, OSError, ValueError):
        return False
    return bool(body.get("ready")) if path == "/readyz" else True


def start_gateway(config: Path, timeout: float = 90.0, env: dict[str, str] | None = None,
                  until: Literal["ready", "healthy"] = "ready") -> RunningGateway:
    """Start `python -m dxgate serve --config FILE` and wait for it; raises StartError with the log tail.

    until="ready": /readyz says ready (SCP, store, models and disk all fine). until="healthy": /healthz
    answers and the SCP answers C-ECHO, for a gateway expected to report not-ready (no models, full disk).
    """
    cfg = yaml.safe_load(config.read_text())
    log_path = config.parent / f"dxgate-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dxgate", "serve", "--config", str(config)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    gw = RunningGateway(proc, config, Path(cfg["data_dir"]), cfg["dicom_port"], cfg["http_port"], log_path,
                        cfg.get("ae_title", "DXGATE"))
    deadline = time.monotonic() + timeout
    try:
        while not _answers(gw, "/readyz" if until == "ready" else "/healthz"):
            if proc.poll() is not None:
                raise StartError(f"dxgate exited with {proc.returncode}:\n{gw.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise StartError(f"dxgate not {until} in {timeout}s:\n{gw.log()[-4000:]}")
            time.sleep(0.25)
        gw.token = token_for(config, gw.data_dir)
        if until == "healthy":
            wait_for_echo(gw.dicom_port, gw.ae_title, timeout_s=max(1.0, deadline - time.monotonic()),
                          alive=lambda: proc.poll() is None)
    except BaseException:
        gw.stop()
        raise
    return gw
