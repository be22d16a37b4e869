"""kill -9 mid-study and mid-job: every acknowledged instance survives and the study completes."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from tests.conftest import require_tool
from tests.integration.conftest import DCMTK_ENV, SR_CLASS, StoreSCP, storescu
from tests.integration.gateway import RunningGateway, start_gateway, write_config

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
    sender = subprocess.Popen([require_tool("storescu"), "-v", "-aet", "PACS", "-aec", "DXGATE",
                               "--scan-directories", "--scan-pattern", "*.dcm", "127.0.0.1", str(gw.dicom_port),
                               str(folder)],
                              env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while len(_spooled(gw)) < 30 and time.monotonic() < deadline:
        time.sleep(0.02)
    gw.kill()  # mid-association
    output, _ = sender.communicate(timeout=60)
    acked = _acknowledged(output)
    assert 30 <= len(acked) < 100, f"kill did not land mid-study ({len(acked)} acknowledged)"

    spooled = _spooled(gw)
    for f in acked:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert uid in spooled, f"acknowledged instance {uid} lost"
        assert pydicom.dcmread(spooled[uid]).pixel_array.shape == (512, 512)

    # Restart; the PACS retries the whole study (duplicates are idempotent).
    gw = start_gateway(cfg)
    try:
        storescu(folder, gw.dicom_port, "DXGATE")
        killed_running = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            jobs = gw.api("/jobs")
            if jobs and jobs[0]["state"] == "RUNNING":
                gw.kill()
                killed_running = True
                break
            if jobs and jobs[0]["state"] in ("DONE", "FAILED"):
                break
            time.sleep(0.05)
        if killed_running:
            gw = start_gateway(cfg)
        (job,) = gw.wait_job_states({"DONE", "FAILED"}, timeout=240)
        detail = gw.api(f"/jobs/{job['id']}")
        assert detail["state"] == "DONE", (detail["failed_stage"], detail["reason"], gw.log()[-3000:])
        assert len(detail["inputs"]) == 100
        if killed_running:
            assert any("requeued" in (e.get("detail") or "") for e in detail["events"]), detail["events"]
        assert len(_spooled(gw)) == 100
    finally:
        gw.stop()
    srs = [ds for ds in storescp_dest.datasets() if ds.SOPClassUID == SR_CLASS]
    assert len(srs) == 1 and srs[0].StudyInstanceUID == chest_study.study_uid
