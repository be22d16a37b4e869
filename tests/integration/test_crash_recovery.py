"""kill -9 mid-study and mid-job: every acknowledged instance survives and the study completes."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from harness.dcmtk import DCMTK_ENV, StoreSCP, storescu
from harness.gateway import SR_CLASS, RunningGateway, start_gateway, write_config
from harness.system import system_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _acknowledged(storescu_output: str) -> list[str]:
    """Files whose C-STORE got a Success response, from `storescu -v` (Sending file / Store Response)."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        m = re.search(r"Sending file: (.+)$", line)
        if m:
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def _spooled(gw: RunningGateway) -> dict[str, Path]:
    out = {}
    for p in (gw.data_dir / "spool").rglob("*.dcm"):
        if not p.name.startswith("."):
            out[p.stem] = p
    return out


def test_sigkill_during_receive_and_during_job(tmp_path: Path, chest_study, gateway_models: Path,
                                               storescp_dest: StoreSCP) -> None:
    dest = {"name": "dest", "ae_title": storescp_dest.ae_title, "host": "127.0.0.1", "port": storescp_dest.port}
    cfg = write_config(tmp_path, gateway_models, destinations=[dest])
    gw = start_gateway(cfg)
    folder = chest_study.files[0].parent
    sender = subprocess.Popen([system_tool("storescu"), "-v", "-aet", "PACS", "-aec", "DXGATE",
                               "--scan-directories", "--scan-pattern", "*.dcm", "127.0.0.1", str(gw.dicom_port),
                               str(folder)],
                              env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while len(_spooled(gw)) < 30 and time.monotonic() < deadline:
        time.sleep(0.02)
    gw.kill()  # mid-association
    output, _ = sender.communicate(timeout=60)
    acked = _acknowledged(output)
    # The 30th instance may be spooled before its response reaches storescu: what counts is that the
    # kill landed mid-study and that every acknowledged instance survived it.
    assert 1 <= len(acked) < 100, f"kill did not land mid-study ({len(acked)} acknowledged)"

    spooled = _spooled(gw)
    for f in acked:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert uid in spooled, f"acknowledged instance {uid} lost"
        assert pydicom.dcmread(spooled[uid]).pixel_array.shape == (512, 512)

    # Restart; the PACS retries the whole study (duplicates are idempotent). What arrived before the
    # kill may already have been routed as a (partial) study; the complete study makes its own job.
    gw = start_gateway(cfg)
    try:
        storescu(folder, gw.dicom_port, "DXGATE")
        killed_running = False
        full_job = _wait_full_job(gw, lambda state: state in ("RUNNING", "DONE", "FAILED"))
        if gw.api(f"/jobs/{full_job}")["state"] == "RUNNING":
            gw.kill()  # mid-job: the lease holder dies
            killed_running = True
            gw = start_gateway(cfg)
        _wait_full_job(gw, lambda state: state in ("DONE", "FAILED"))
        detail = gw.api(f"/jobs/{full_job}")
        assert detail["state"] == "DONE", (detail["failed_stage"], detail["reason"], gw.log()[-3000:])
        if killed_running:
            assert any("requeued" in (e.get("detail") or "") for e in detail["events"]), detail["events"]
        assert len(_spooled(gw)) == 100
        full_sr = {o["sop_instance_uid"] for o in detail["outputs"] if o["kind"] == "sr"}
    finally:
        gw.stop()
    srs = {str(ds.SOPInstanceUID) for ds in storescp_dest.datasets() if ds.SOPClassUID == SR_CLASS}
    assert full_sr and full_sr <= srs


def _wait_full_job(gw: RunningGateway, done: Callable[[str], bool], timeout: float = 240.0) -> int:
    """The id of the job that reads all 100 slices, once `done(state)` holds for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job in gw.api("/jobs"):
            detail = gw.api(f"/jobs/{job['id']}")
            if len(detail["inputs"]) == 100 and done(detail["state"]):
                return int(job["id"])
        time.sleep(0.05)
    raise AssertionError(f"no 100-slice job settled in {timeout}s: {gw.api('/jobs')}\n{gw.log()[-3000:]}")
