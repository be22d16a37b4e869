"""The README's "Try it" block, run exactly as written against a real `dxgate serve` and dcmtk peers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pydicom
import pytest

from harness.system import free_port, system_tool
from tests.doc_blocks import REPO, VENV_BIN, block_under, newcomer_dir, venv_env

pytestmark = pytest.mark.integration
TIMEOUT_S = 600


def test_storescu_on_the_venvs_path_is_dcmtks() -> None:
    """After `. .venv/bin/activate`, `storescu` and `storescp` are dcmtk's, not pynetdicom's scripts."""
    for tool in ("storescu", "storescp", "echoscu"):
        dcmtk = system_tool(tool)  # the installed binary; skips the test where dcmtk is not installed
        found = shutil.which(tool, path=venv_env()["PATH"])
        assert found and Path(found).parent != VENV_BIN, f"{tool} on the venv's PATH is {found}, not dcmtk's"
        assert os.path.realpath(found) == os.path.realpath(dcmtk), (found, dcmtk)
    version = subprocess.run(["storescu", "--version"], env=venv_env(), capture_output=True, text=True, timeout=30)
    assert "dcmtk" in (version.stdout + version.stderr).lower()


def test_try_it_runs_as_written(tmp_path: Path) -> None:
    block = block_under(REPO / "README.md", "Try it")
    for tool in ("storescu", "storescp", "curl"):
        system_tool(tool)
    work = newcomer_dir(tmp_path)
    ports = {"DICOM_PORT": str(free_port()), "HTTP_PORT": str(free_port()), "PACS_PORT": str(free_port())}
    for name in ports:  # the block reads its ports from these variables (with defaults for a newcomer)
        assert f"${{{name}:-" in block, f"the Try it block does not read {name}"
    proc = subprocess.Popen(["bash", "-e", "-c", block], cwd=work, env=venv_env(**ports), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        out = ""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the block's shell and what it left running, nothing else
            out += proc.communicate()[0]
    log = (work / "gateway.log").read_text()[-3000:] if (work / "gateway.log").exists() else ""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-4000:]}\ngateway.log:\n{log}"

    study = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in (work / "chest").iterdir()}
    assert len(study) == 1 and (work / "chest.annotations.csv").is_file()
    job_lines = [ln.split() for ln in out.splitlines() if "lung_nodule_ct" in ln.split()[2:3]]
    assert job_lines and job_lines[-1][1] == "DONE", out[-4000:]
    results = [pydicom.dcmread(p, stop_before_pixels=True) for p in (work / "pacs").iterdir()]
    assert {str(ds.Modality) for ds in results} >= {"SR", "SEG", "PR"}, [p.name for p in (work / "pacs").iterdir()]
    assert {str(ds.StudyInstanceUID) for ds in results} == study, "results go back into the same study"
