"""`python -m dxgate serve --config FILE` as a real subprocess on free loopback ports; its API; its stop."""

from __future__ import annotations

import json
import os
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


def api_get(http_port: int, path: str, timeout_s: float = 10.0) -> Any:
    """GET a JSON body from the gateway's API on 127.0.0.1 (urllib raises on 4xx/5xx)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=timeout_s) as r:
        return json.loads(r.read())


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

    @property
    def pid(self) -> int:
        return self.proc.pid

    def api(self, path: str) -> Any:
        return api_get(self.http_port, path)

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
    """
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
        **extra,
    }
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "dxgate.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


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
        if until == "healthy":
            wait_for_echo(gw.dicom_port, gw.ae_title, timeout_s=max(1.0, deadline - time.monotonic()),
                          alive=lambda: proc.poll() is None)
    except BaseException:
        gw.stop()
        raise
    return gw
