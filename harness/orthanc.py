"""Orthanc as the PACS: a real Orthanc process with its own config on free ports.

Its Lua `OnStableStudy` forwards the image series (CT/MR) of a stable study to dxgate through its REST
API (`/modalities/dxgate/store`), as a PACS auto-routing rule would; results come back into the same
study over C-STORE and are checked through Orthanc's REST API.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.system import StartError, free_port, log_tail, stop_process, system_tool

FORWARD_LUA = """
function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  local images = {}
  for _, s in pairs(series) do
    local modality = s['MainDicomTags']['Modality']
    if modality == 'CT' or modality == 'MR' then
      table.insert(images, s['ID'])
    end
  end
  if #images > 0 then
    RestApiPost('/modalities/dxgate/store', DumpJson(images, true))
  end
end
"""


@dataclass
class RunningOrthanc:
    proc: subprocess.Popen
    dicom_port: int
    http_port: int
    root: Path

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body: bytes) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def study_series_modalities(self, study_uid: str) -> list[str]:
        found = self.post("/tools/find", json.dumps({"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
                          .encode())
        if not found:
            return []
        series = self.get(f"/studies/{found[0]}/series")
        return sorted(s["MainDicomTags"].get("Modality", "") for s in series)

    def stop(self) -> None:
        stop_process(self.proc, timeout_s=15)


def start_orthanc(root: Path, dxgate_ae: str, dxgate_port: int, stable_age: int = 2,
                  dicom_port: int | None = None) -> RunningOrthanc:
    exe = system_tool("Orthanc")
    dicom_port, http_port = dicom_port or free_port(), free_port()
    (root / "storage").mkdir(parents=True, exist_ok=True)
    lua = root / "forward.lua"
    lua.write_text(FORWARD_LUA)
    config = {
        "Name": "dxgate-test-pacs",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StableAge": stable_age,
        "DicomModalities": {"dxgate": [dxgate_ae, "127.0.0.1", dxgate_port]},
        "LuaScripts": [str(lua)],
        "Plugins": [],
        "DicomScpTimeout": 30,
        "HttpsVerifyPeers": False,
    }
    cfg = root / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    with open(root / "orthanc.log", "wb") as log:
        proc = subprocess.Popen([exe, str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=root)
    orthanc = RunningOrthanc(proc, dicom_port, http_port, root)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError(f"Orthanc exited: {log_tail(root / 'orthanc.log', 3000)}")
        try:
            orthanc.get("/system")
            return orthanc
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    orthanc.stop()
    raise StartError("Orthanc did not start in 30 s")
