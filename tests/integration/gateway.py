"""Run `dxgate serve` as a real subprocess with its own config on free ports; query its API."""

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
from typing import Any

import yaml

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RunningGateway:
    proc: subprocess.Popen
    config: Path
    data_dir: Path
    dicom_port: int
    http_port: int
    log_path: Path

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as in a power cut of the process."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

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
    """A gateway config routing chest CT to lung_nodule_ct and spine to spine_vertebrae_ct."""
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
        "rules": [
            {"name": "chest-ct-nodules", "match": {"modality": ["CT"], "body_part": ["CHEST"]},
             "models": ["lung_nodule_ct"]},
            {"name": "spine", "match": {"modality": ["CT"], "body_part": ["SPINE"]},
             "models": ["spine_vertebrae_ct"]},
        ],
        "sender": {"max_attempts": 8, "backoff_initial_s": 0.5, "backoff_max_s": 2.0, "timeout_s": 10},
        "log_format": "json",
        **extra,
    }
    path = tmp / "dxgate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_gateway(config: Path, timeout: float = 90.0, env: dict[str, str] | None = None) -> RunningGateway:
    cfg = yaml.safe_load(config.read_text())
    log_path = config.parent / f"dxgate-{time.monotonic_ns()}.log"
    proc = subprocess.Popen([sys.executable, "-m", "dxgate", "serve", "--config", str(config)],
                            cwd=REPO, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    gw = RunningGateway(proc, config, Path(cfg["data_dir"]), cfg["dicom_port"], cfg["http_port"], log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"dxgate exited with {proc.returncode}:\n{gw.log()[-4000:]}")
        try:
            if gw.api("/readyz").get("ready"):
                return gw
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            pass
        time.sleep(0.25)
    gw.stop()
    raise AssertionError(f"dxgate not ready in {timeout}s:\n{gw.log()[-4000:]}")
