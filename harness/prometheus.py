"""A real Prometheus server (Debian `prometheus`) on a free loopback port, scraping a dxgate's /metrics.

The scrape config sends the gateway's bearer token (`authorization: {credentials: ...}`), as a site's
Prometheus would (docs/deployment.md "Metrics"); `query` calls the HTTP API's instant query endpoint.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness.system import StartError, free_port, log_tail, stop_process, system_tool


@dataclass
class RunningPrometheus:
    proc: subprocess.Popen
    port: int
    root: Path

    def api(self, path: str, **params: str) -> Any:
        """GET `/api/v1/<path>`; the `data` of a successful answer (AssertionError otherwise)."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body.get("status") == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector: [{"metric": {labels}, "value": [time, "value"]}, ...]."""
        return self.api("query", query=promql)["result"]

    def targets_up(self) -> list[dict[str, Any]]:
        """The active scrape targets whose last scrape succeeded."""
        return [t for t in self.api("targets")["activeTargets"] if t.get("health") == "up"]

    def log(self) -> str:
        return log_tail(self.root / "prometheus.log")

    def stop(self) -> None:
        stop_process(self.proc, timeout_s=15)


def scrape_config(target: str, token: str, interval_s: float = 1.0) -> dict[str, Any]:
    """A prometheus.yml scraping dxgate's /metrics at `target` (host:port) with a bearer token."""
    every = f"{int(interval_s * 1000)}ms"
    return {
        "global": {"scrape_interval": every, "evaluation_interval": every},
        "scrape_configs": [{
            "job_name": "dxgate",
            "metrics_path": "/metrics",
            "scrape_interval": every,
            "scrape_timeout": every,
            "authorization": {"type": "Bearer", "credentials": token},
            "static_configs": [{"targets": [target]}],
        }],
    }


def start_prometheus(root: Path, target: str, token: str, interval_s: float = 1.0,
                     timeout_s: float = 30.0) -> RunningPrometheus:
    """Start `prometheus` scraping `target` every `interval_s`; raises ToolMissing without the binary."""
    exe = system_tool("prometheus")
    root.mkdir(parents=True, exist_ok=True)
    config = root / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(target, token, interval_s)), encoding="utf-8")
    config.chmod(0o600)  # it holds the token
    port = free_port()
    with open(root / "prometheus.log", "wb") as log:
        proc = subprocess.Popen([exe, f"--config.file={config}", f"--storage.tsdb.path={root / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=root)
    prom = RunningPrometheus(proc, port, root)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError(f"prometheus exited with {proc.returncode}: {prom.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return prom
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.2)
    prom.stop()
    raise StartError(f"prometheus not ready in {timeout_s}s: {prom.log()}")
