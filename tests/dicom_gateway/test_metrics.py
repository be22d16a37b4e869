"""/metrics: the Prometheus text format over a real job store, behind the API's bearer tokens.

The exposition is parsed back with prometheus_client's own text parser, so a malformed line fails.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from dicom_gateway.api.app import create_app
from dicom_gateway.metrics import OTHER, cap_labels, observe_cstore, stage_histograms
from dicom_gateway.settings import Settings
from dicom_gateway.states import Stage
from dicom_gateway.store import InstanceRecord, Store
from harness.gateway import REPO, new_api_token

STUDY = "1.2.826.0.1.3680043.10.9"
SOPS = [f"{STUDY}.2.{i}" for i in range(1, 4)]
PATIENT_NAME = "Doe^Jane"


@dataclass
class Env:
    client: TestClient
    tokens: dict[str, str]

    def get(self, role: str | None = "read") -> tuple[int, str, str]:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        r = self.client.get("/metrics", headers=headers)
        return r.status_code, r.headers.get("content-type", ""), r.text


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    store = Store(tmp_path / "jobs.sqlite3", durable=False)
    assoc = store.associations.open("CT_SCANNER", "127.0.0.1", called_ae="DXGATE")
    for sop in SOPS:
        store.instances.record(InstanceRecord(sop, "1.2.840.10008.5.1.4.1.1.2", STUDY, f"{STUDY}.2", None,
                                              str(tmp_path / sop), 10, "CT_SCANNER", assoc, modality="CT"))
    store.associations.close(assoc, aborted=False)
    failed, _ = store.jobs.create(study_uid=STUDY, model="lung_nodule_ct", model_version="1.0.0",
                                  series_uid=f"{STUDY}.2", input_uids=SOPS, destinations=["pacs"], rule="chest")
    assert store.jobs.claim("w1", lease_s=60) is not None
    store.jobs.fail(failed, Stage.INFER, "BackendError: out of memory")
    done, _ = store.jobs.create(study_uid=STUDY, model="spine_vertebrae_ct", model_version="1.0.0",
                                series_uid=f"{STUDY}.2", input_uids=SOPS[:2], destinations=["pacs"], rule="spine")
    assert store.jobs.claim("w1", lease_s=60) is not None
    store.jobs.record_stages(done, {"load": 0.2, "infer": 1.7, "encode": 0.04}, "w1")
    store.jobs.finish_encoding(done, [{"kind": "SR", "sop_instance_uid": "2.25.7"}], "cd" * 32, 1, ["pacs"])
    store.deliveries.record(done, "pacs", ok=True)
    store.jobs.create(study_uid=STUDY, model="lung_nodule_ct", model_version="1.0.0", series_uid=f"{STUDY}.3",
                      input_uids=[f"{STUDY}.3.1"], destinations=["pacs"], rule="chest")
    tokens, entries = {}, []
    for role in ("read", "admin"):
        tokens[role], entry = new_api_token(f"{role}-token", role)
        entries.append(entry)
    settings = Settings(data_dir=tmp_path, api_tokens=entries, http_allowed_hosts=["localhost"])
    with TestClient(create_app(settings, store, lambda: {"store": True}), base_url="http://localhost") as client:
        yield Env(client, tokens)
    store.close()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_need_a_token_and_read_suffices(env: Env) -> None:
    assert env.get(None)[0] == 401
    env.tokens["wrong"] = new_api_token()[0]
    assert env.get("wrong")[0] == 401
    status, content_type, _ = env.get("read")
    assert status == 200
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type


def test_metrics_report_store_state_and_stage_histograms(env: Env) -> None:
    observe_cstore(0x0000)
    observe_cstore(0xA700)
    _, _, text = env.get()
    s = _samples(text)
    assert s[("dxgate_studies", (("state", "RECEIVING"),))] == 1
    assert s[("dxgate_studies", (("state", "ROUTED"),))] == 0
    assert s[("dxgate_jobs", (("model", "lung_nodule_ct"), ("state", "FAILED")))] == 1
    assert s[("dxgate_jobs", (("model", "lung_nodule_ct"), ("state", "QUEUED")))] == 1
    assert s[("dxgate_jobs", (("model", "spine_vertebrae_ct"), ("state", "DONE")))] == 1
    assert s[("dxgate_queue_depth", ())] == 1
    assert s[("dxgate_deliveries", (("destination", "pacs"), ("state", "SENT")))] == 1
    assert s[("dxgate_deliveries", (("destination", "pacs"), ("state", "DEAD")))] == 0
    assert s[("dxgate_associations", (("calling_ae", "CT_SCANNER"),))] == 1
    assert s[("dxgate_instances_stored", (("calling_ae", "CT_SCANNER"),))] == 3
    # only the DONE job's stages: infer 1.7 s falls in the 2.5 s bucket, not the 1 s one
    assert s[("dxgate_stage_seconds_count", (("stage", "infer"),))] == 1
    assert s[("dxgate_stage_seconds_sum", (("stage", "infer"),))] == pytest.approx(1.7)
    assert s[("dxgate_stage_seconds_bucket", (("le", "1.0"), ("stage", "infer")))] == 0
    assert s[("dxgate_stage_seconds_bucket", (("le", "2.5"), ("stage", "infer")))] == 1
    assert s[("dxgate_stage_seconds_bucket", (("le", "+Inf"), ("stage", "send")))] == 1
    assert s[("dxgate_cstore_responses_total", (("status", "0xA700"),))] >= 1
    assert s[("dxgate_cstore_responses_total", (("status", "0x0000"),))] >= 1


def test_no_uid_or_patient_data_in_any_label(env: Env) -> None:
    _, _, text = env.get()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for value in sample.labels.values():
                assert STUDY not in value and PATIENT_NAME not in value, (sample.name, value)
    assert STUDY not in text


def test_calling_ae_labels_are_capped() -> None:
    counts = [(f"AE{i:02d}", 100 - i) for i in range(30)] + [("", 1)]
    capped = cap_labels(counts, limit=20)
    assert len(capped) == 21 and OTHER in capped
    assert sum(capped.values()) == sum(n for _, n in counts)
    assert "AE00" in capped and "AE29" not in capped


def test_stage_histograms_skip_bad_rows() -> None:
    hist = stage_histograms(['{"infer": 0.3, "load": 700}', "not json", '{"infer": "x"}', "{}"])
    counts, total, n = hist["infer"]
    assert n == 1 and total == pytest.approx(0.3) and counts[-1] == 1
    assert hist["load"][0][-2] == 0 and hist["load"][0][-1] == 1  # beyond the last bound: only +Inf


def test_grafana_dashboard_queries_only_exported_metrics(env: Env) -> None:
    dashboard = json.loads((REPO / "docs" / "grafana-dxgate.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 4
    _, _, text = env.get()
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    for expr in exprs:
        for name in re.findall(r"\bdxgate_\w+", expr):
            assert name in exported, (name, expr)
