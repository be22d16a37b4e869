"""Failure paths of a real `dxgate serve`: refused peers and data, full disk, unreachable destinations, no route.

Every test talks DICOM on loopback to the gateway subprocess (dcmtk and pynetdicom as peers) and checks
what the gateway recorded through its HTTP API and its spool. One gateway serves the tests that can share
it (distinct studies, cloned with fresh UIDs); the full-disk and dead-letter tests need their own settings.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.filereader import read_file_meta_info

from harness.dcmtk import DCMTK_ENV, StoreSCP, start_storescp, storescu
from harness.gateway import REPO, SR_CLASS, RunningGateway, start_gateway, write_config
from harness.system import free_port
from tests.conftest import require_tool
from tests.integration.failures import (
    api_call,
    assert_each_output_once,
    c_store_raw,
    clone_study,
    destination,
    garbage_file,
    is_failure,
    spooled_sops,
    study_jobs,
    wait_for,
    wait_study_job,
)

pytestmark = pytest.mark.integration

CHEST_MATCH = {"modality": ["CT"], "body_part": ["CHEST"]}
FAST_SENDER = {"max_attempts": 20, "backoff_initial_s": 0.5, "backoff_max_s": 1.0, "timeout_s": 5}


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def small_chest(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A 40-slice 256x256 synthetic chest CT with one nodule (small enough to keep these tests fast)."""
    from training.synthetic import write_chest_ct_study

    return write_chest_ct_study(tmp_path_factory.mktemp("small_chest"), seed=5, slices=40, nodules=1, rows=256)


@dataclass
class SharedGateway:
    gw: RunningGateway
    live: StoreSCP
    flaky_port: int
    tmp: Path


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, gateway_models: Path) -> Iterator[SharedGateway]:
    """One gateway: calling AEs PACS and PACS2 allowed; PACS studies go to LIVE, PACS2 to LIVE and FLAKY.

    FLAKY's port has no listener until a test starts one.
    """
    tmp = tmp_path_factory.mktemp("shared_gateway")
    live = start_storescp(tmp / "live", "LIVE")
    flaky_port = free_port()
    rules = [
        {"name": "chest-pacs", "match": {**CHEST_MATCH, "calling_ae": ["PACS"]}, "models": ["lung_nodule_ct"],
         "destinations": ["live"]},
        {"name": "chest-pacs2", "match": {**CHEST_MATCH, "calling_ae": ["PACS2"]}, "models": ["lung_nodule_ct"],
         "destinations": ["live", "flaky"]},
    ]
    cfg = write_config(tmp, gateway_models, destinations=[destination("live", live.port),
                                                          destination("flaky", flaky_port)],
                       allowed_calling_aes=["PACS", "PACS2"], rules=rules, sender=FAST_SENDER)
    gw = start_gateway(cfg)
    try:
        yield SharedGateway(gw, live, flaky_port, tmp)
    finally:
        gw.stop()
        live.stop()


# -- tests ----------------------------------------------------------------------------------------
def test_unknown_calling_ae_is_rejected_at_association(shared: SharedGateway, small_chest) -> None:
    gw = shared.gw
    echo = require_tool("echoscu")
    ok = subprocess.run([echo, "-aet", "PACS", "-aec", "DXGATE", "127.0.0.1", str(gw.dicom_port)],
                        env=DCMTK_ENV, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([echo, "-v", "-aet", "INTRUDER", "-aec", "DXGATE", "127.0.0.1", str(gw.dicom_port)],
                             env=DCMTK_ENV, capture_output=True, text=True)
    assert refused.returncode != 0
    assert "rejected" in (refused.stdout + refused.stderr).lower(), refused.stderr

    study_uid, files = clone_study(small_chest.files, shared.tmp / "intruder", limit=3)
    res = storescu(files[0].parent, gw.dicom_port, "DXGATE", "INTRUDER", check=False)
    assert res.returncode != 0, res.stderr
    status, _ = api_call(gw, f"/studies/{study_uid}")
    assert status == 404
    assert not spooled_sops(gw) & {p.stem for p in files}


def test_broken_data_sets_fail_while_a_concurrent_study_completes(shared: SharedGateway, small_chest) -> None:
    gw = shared.gw
    broken = shared.tmp / "broken"
    broken_study, (slice_file,) = clone_study(small_chest.files, broken, limit=1)
    raw = slice_file.read_bytes()
    truncated = broken / "truncated.dcm"
    truncated.write_bytes(raw[: len(raw) // 2])
    slice_file.unlink()
    garbage_sop = garbage_file(broken / "garbage.dcm")
    truncated_sop = str(read_file_meta_info(truncated).MediaStorageSOPInstanceUID)

    good_study, good_files = clone_study(small_chest.files, shared.tmp / "good")
    sender = subprocess.Popen([require_tool("storescu"), "-aet", "PACS", "-aec", "DXGATE", "--scan-directories",
                               "127.0.0.1", str(gw.dicom_port), str(good_files[0].parent)],
                              env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(gw, "the concurrent study's first instance",
                 lambda: api_call(gw, f"/studies/{good_study}")[0] == 200 or sender.poll() is not None, 60)
        statuses = c_store_raw(gw.dicom_port, [truncated, broken / "garbage.dcm"])
        output, _ = sender.communicate(timeout=120)
    finally:
        if sender.poll() is None:
            sender.kill()
    assert sender.returncode == 0, output[-2000:]
    for name, status in zip(("truncated", "garbage"), statuses, strict=True):
        assert is_failure(status), f"{name}: status {status}"
        assert 0xC000 <= status <= 0xCFFF, f"{name}: expected 'cannot understand' (0xCxxx), got 0x{status:04X}"
    assert api_call(gw, f"/studies/{broken_study}")[0] == 404
    assert not spooled_sops(gw) & {garbage_sop, truncated_sop}

    detail = wait_study_job(gw, good_study, {"DONE", "FAILED"}, timeout=180)
    assert detail["state"] == "DONE", detail
    assert len(detail["inputs"]) == len(good_files)
    assert_each_output_once(shared.live, detail)


def test_mr_series_is_unrouted_with_the_reason(shared: SharedGateway, small_chest) -> None:
    gw = shared.gw
    study_uid, files = clone_study(small_chest.files, shared.tmp / "mr", limit=20, Modality="MR",
                                   BodyPartExamined="CHEST")
    storescu(files[0].parent, gw.dicom_port, "DXGATE", "PACS")
    study = wait_for(gw, "the MR study to be routed",
                     lambda: (s := api_call(gw, f"/studies/{study_uid}"))[0] == 200
                     and s[1]["state"] in ("ROUTED", "UNROUTED") and s[1])
    assert study["state"] == "UNROUTED", study
    assert "modality MR" in (study["reason"] or ""), study["reason"]
    assert study["jobs"] == [] and study_jobs(gw, study_uid) == []
    assert [s["modality"] for s in study["series"]] == ["MR"]


def test_destination_down_then_up_never_blocks_the_live_one(shared: SharedGateway, small_chest) -> None:
    gw = shared.gw
    study_uid, files = clone_study(small_chest.files, shared.tmp / "two_destinations")
    storescu(files[0].parent, gw.dicom_port, "DXGATE", "PACS2")

    def live_sent_flaky_failing() -> dict | None:
        jobs = study_jobs(gw, study_uid)
        if not jobs:
            return None
        detail = gw.api(f"/jobs/{jobs[0]['id']}")
        by_dest = {d["destination"]: d for d in detail["deliveries"]}
        if by_dest.get("live", {}).get("state") == "SENT" and by_dest.get("flaky", {}).get("attempts", 0) >= 1:
            return detail
        return None

    detail = wait_for(gw, "LIVE delivered while FLAKY fails", live_sent_flaky_failing, timeout=180)
    flaky = next(d for d in detail["deliveries"] if d["destination"] == "flaky")
    assert flaky["state"] == "PENDING", flaky  # far from its 20 attempts: still retrying
    assert flaky["attempts"] < FAST_SENDER["max_attempts"] // 2, flaky
    assert flaky["last_error"], flaky
    assert detail["state"] == "SENDING", detail
    assert_each_output_once(shared.live, detail)  # LIVE got everything without waiting for FLAKY

    flaky_scp = start_storescp(shared.tmp / "flaky", "FLAKY", port=shared.flaky_port)
    try:
        done = wait_study_job(gw, study_uid, {"DONE", "FAILED"}, timeout=60)
    finally:
        flaky_scp.stop()
    assert done["state"] == "DONE", done
    assert all(d["state"] == "SENT" for d in done["deliveries"]), done["deliveries"]
    assert next(d for d in done["deliveries"] if d["destination"] == "flaky")["attempts"] >= 2
    assert_each_output_once(flaky_scp, done)
    assert_each_output_once(shared.live, done)
    assert any(ds.SOPClassUID == SR_CLASS and ds.StudyInstanceUID == study_uid for ds in flaky_scp.datasets())


def test_full_disk_answers_out_of_resources(tmp_path: Path, gateway_models: Path, small_chest) -> None:
    (tmp_path / "var").mkdir()
    free_mb = shutil.disk_usage(tmp_path / "var").free // (1024 * 1024)
    cfg = write_config(tmp_path, gateway_models, min_free_disk_mb=int(free_mb) + 1_000_000)
    gw = start_gateway(cfg, until="healthy")
    try:
        status, body = api_call(gw, "/readyz")
        assert status == 503, body
        assert body["checks"]["disk"] is False, body
        assert body["ready"] is False
        study_uid, files = clone_study(small_chest.files, tmp_path / "study", limit=2)
        assert c_store_raw(gw.dicom_port, files) == [0xA700, 0xA700]
        res = storescu(files[0], gw.dicom_port, "DXGATE", "PACS", check=False)
        assert "0xa700" in (res.stdout + res.stderr).lower() or res.returncode != 0, res.stderr
        assert api_call(gw, f"/studies/{study_uid}")[0] == 404
        assert gw.api("/jobs") == []
        assert not spooled_sops(gw)
    finally:
        gw.stop()


def test_dead_letter_then_cli_replay_delivers(tmp_path: Path, gateway_models: Path, small_chest) -> None:
    port = free_port()  # nothing listens here until the replay
    sender = {"max_attempts": 2, "backoff_initial_s": 0.5, "backoff_max_s": 1.0, "timeout_s": 5}
    cfg = write_config(tmp_path, gateway_models, destinations=[destination("pacs", port, "DEST")], sender=sender)
    gw = start_gateway(cfg)
    dest: StoreSCP | None = None
    try:
        storescu(small_chest.files[0].parent, gw.dicom_port, "DXGATE")
        failed = wait_study_job(gw, small_chest.study_uid, {"FAILED", "DONE"}, timeout=180)
        assert failed["state"] == "FAILED", failed
        assert failed["failed_stage"] == "send", failed
        (delivery,) = failed["deliveries"]
        assert delivery["state"] == "DEAD" and delivery["attempts"] == 2 and delivery["last_error"], delivery
        assert failed["outputs"], failed

        dest = start_storescp(tmp_path / "dest", "DEST", port=port)
        res = subprocess.run([sys.executable, "-m", "dxgate", "jobs", "--config", str(cfg), "replay",
                              str(failed["id"])], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "SENDING" in res.stdout, res.stdout
        done = wait_study_job(gw, small_chest.study_uid, {"DONE", "FAILED"}, timeout=60)
        assert done["state"] == "DONE", done
        assert done["id"] == failed["id"] and done["deliveries"][0]["state"] == "SENT"
        assert any("replay" in (e["detail"] or "") for e in done["events"]), done["events"]
        assert len(gw.api("/jobs")) == 1  # a resend, not a new job
        assert_each_output_once(dest, done)
    finally:
        gw.stop()
        if dest is not None:
            dest.stop()
