"""Orthanc as the PACS: a stable study is auto-forwarded to dxgate; results land in the same study."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from harness.dcmtk import DCMTK_ENV, storescu
from harness.gateway import start_gateway, write_config
from harness.orthanc import start_orthanc
from harness.system import free_port, system_tool

pytestmark = pytest.mark.integration


def test_orthanc_forwards_stable_study_and_gets_results_back(tmp_path: Path, chest_study,
                                                              gateway_models: Path) -> None:
    system_tool("storescu")
    orthanc_dicom = free_port()
    dest = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_dicom, "overlay": "gsps"}
    cfg = write_config(tmp_path, gateway_models, destinations=[dest], allowed_calling_aes=["ORTHANC", "PACS"])
    gw = start_gateway(cfg)
    try:
        orthanc = start_orthanc(tmp_path / "orthanc", "DXGATE", gw.dicom_port, stable_age=2,
                                dicom_port=orthanc_dicom)
    except FileNotFoundError:
        gw.stop()
        pytest.skip("Orthanc is not installed (the CI script installs it)")
    try:
        # The modality sends to the PACS; the PACS's Lua rule forwards the stable study to dxgate.
        storescu(chest_study.files[0].parent, orthanc.dicom_port, "ORTHANC", "CTSCANNER")
        deadline = time.monotonic() + 240
        modalities: list[str] = []
        while time.monotonic() < deadline:
            modalities = orthanc.study_series_modalities(chest_study.study_uid)
            if "SR" in modalities and ("PR" in modalities or _job_findings(gw) == 0):
                break
            time.sleep(1.0)
        assert "CT" in modalities
        assert "SR" in modalities, (modalities, gw.log()[-3000:])
        if _job_findings(gw):
            assert "SEG" in modalities and "PR" in modalities, modalities
        # the job settles when the sender records the delivery, after the association's last C-STORE: the
        # PACS can show the results a moment before that
        jobs = gw.api("/jobs")
        while time.monotonic() < deadline and any(j["state"] not in ("DONE", "FAILED") for j in jobs):
            time.sleep(0.5)
            jobs = gw.api("/jobs")
        assert [j["state"] for j in jobs] == ["DONE"]  # re-forwarding the study makes no second job
        # The forwarded study arrived from ORTHANC, an allowed AE; an unknown AE is refused at association.
        echo = subprocess.run([system_tool("echoscu"), "-aet", "INTRUDER", "-aec", "DXGATE", "127.0.0.1",
                               str(gw.dicom_port)], capture_output=True, text=True, env=DCMTK_ENV)
        assert echo.returncode != 0
        assert "Rejected" in echo.stderr + echo.stdout or "rejected" in (echo.stderr + echo.stdout).lower()
    finally:
        orthanc.stop()
        gw.stop()


def _job_findings(gw) -> int | None:  # noqa: ANN001
    jobs = gw.api("/jobs")
    return jobs[0].get("findings") if jobs else None
