"""A real Prometheus scrapes a real `dxgate serve` while a chest CT runs, then answers queries on its metrics.

Prometheus (Debian `prometheus`) scrapes /metrics every second with a `read`-role bearer token, as a
site's scrape config would (docs/deployment.md "Metrics"); the study goes in with dcmtk storescu and its
results out to a dcmtk storescp.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from harness.dcmtk import StoreSCP, storescu
from harness.gateway import REPO, new_api_token, start_gateway, write_config
from harness.models import operating_point_copy
from harness.prometheus import RunningPrometheus, start_prometheus

pytestmark = pytest.mark.integration


def _value(prom: RunningPrometheus, promql: str, timeout_s: float = 30.0, at_least: float = 1.0) -> float:
    """The query's single value once it is >= at_least (Prometheus scrapes every second); fail with its log."""
    deadline = time.monotonic() + timeout_s
    result: list = []
    while time.monotonic() < deadline:
        result = prom.query(promql)
        if len(result) == 1 and float(result[0]["value"][1]) >= at_least:
            return float(result[0]["value"][1])
        time.sleep(0.5)
    raise AssertionError(f"{promql}: {result}\n{prom.log()}")


def _answered(prom: RunningPrometheus, promql: str, timeout_s: float = 20.0) -> None:
    """The query is valid PromQL and answers with at least one series (a rate needs two scrapes: wait)."""
    deadline = time.monotonic() + timeout_s
    while not prom.query(promql):
        assert time.monotonic() < deadline, f"no series for {promql}"
        time.sleep(0.5)


def test_prometheus_scrapes_stage_histogram_and_job_states(tmp_path: Path, chest_study, gateway_models: Path,
                                                            storescp_dest: StoreSCP) -> None:
    dest = {"name": "dest", "ae_title": storescp_dest.ae_title, "host": "127.0.0.1", "port": storescp_dest.port}
    models = operating_point_copy(gateway_models, list(chest_study.files), tmp_path / "models")
    admin, admin_entry = new_api_token("harness", "admin")
    reader, reader_entry = new_api_token("prometheus", "read")
    # 3 s of quiet before a study is complete: several scrapes see it RECEIVING
    gw = start_gateway(write_config(tmp_path, models, destinations=[dest], quiet_seconds=3.0,
                                    api_tokens=[admin_entry, reader_entry]))
    gw.token = admin
    prom = None
    try:
        prom = start_prometheus(tmp_path / "prometheus", f"127.0.0.1:{gw.http_port}", reader, interval_s=1.0)
        deadline = time.monotonic() + 30
        while not prom.targets_up():
            assert time.monotonic() < deadline, prom.api("targets")
            time.sleep(0.5)
        storescu(chest_study.files[0].parent, gw.dicom_port, "DXGATE", "CTSCANNER")
        (job,) = gw.wait_job_states({"DONE", "FAILED"}, timeout=240)
        assert job["state"] == "DONE", (gw.api(f"/jobs/{job['id']}"), gw.log()[-3000:])

        assert _value(prom, 'dxgate_stage_seconds_count{job="dxgate",stage="infer"}') == 1
        infer_s = gw.api(f"/jobs/{job['id']}")["stage_seconds"]["infer"]
        assert _value(prom, 'dxgate_stage_seconds_sum{stage="infer"}', at_least=0) == pytest.approx(infer_s, rel=1e-3)
        p95 = prom.query('histogram_quantile(0.95, sum by (le) (dxgate_stage_seconds_bucket{stage="infer"}))')
        assert p95 and float(p95[0]["value"][1]) > 0, p95
        assert _value(prom, 'dxgate_jobs{model="lung_nodule_ct",state="DONE"}') == 1
        assert _value(prom, 'dxgate_jobs{model="lung_nodule_ct",state="QUEUED"}', at_least=0) == 0
        assert _value(prom, 'dxgate_studies{state="ROUTED"}') == 1
        assert _value(prom, 'dxgate_deliveries{destination="dest",state="SENT"}') == 1
        assert _value(prom, 'dxgate_associations{calling_ae="CTSCANNER"}') == 1
        assert _value(prom, 'dxgate_instances_stored{calling_ae="CTSCANNER"}') == len(chest_study.files)
        assert _value(prom, 'dxgate_cstore_responses_total{status="0x0000"}') == len(chest_study.files)
        assert _value(prom, 'dxgate_model_load_seconds{model="lung_nodule_ct"}', at_least=0) > 0
        # scraped while the study ran, not only after: the study was RECEIVING in some earlier scrape
        assert _value(prom, 'max_over_time(dxgate_studies{state="RECEIVING"}[10m])') == 1
        dashboard = json.loads((REPO / "docs" / "grafana-dxgate.json").read_text(encoding="utf-8"))
        for panel in dashboard["panels"]:  # every panel's query is valid PromQL with data behind it
            for target in panel["targets"]:
                _answered(prom, target["expr"].replace("$__rate_interval", "1m"))
        for series in prom.api("series", **{"match[]": '{job="dxgate"}'}):
            assert chest_study.study_uid not in str(series), series  # no UID in any label
    finally:
        if prom is not None:
            prom.stop()
        gw.stop()
