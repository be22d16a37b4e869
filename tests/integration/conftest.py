"""Fixtures for the end-to-end tests: a synthetic study, the models the gateway serves, dcmtk peers."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from tests.conftest import free_port, require_tool

REPO = Path(__file__).resolve().parents[2]
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"      # Comprehensive 3D SR Storage
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"      # Segmentation Storage
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"     # Grayscale Softcopy Presentation State Storage
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"          # Secondary Capture Image Storage


@pytest.fixture(scope="session")
def chest_study(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A 100-slice 512x512 synthetic chest CT with two nodules (LUNA16-style annotations)."""
    from training.synthetic import write_chest_ct_study

    out = tmp_path_factory.mktemp("chest100")
    return write_chest_ct_study(out, seed=11, slices=100, nodules=2, rows=512)


@pytest.fixture(scope="session")
def gateway_models(request: pytest.FixtureRequest) -> Path:
    """The shipped models/ when the lung model is there, else a model trained a few steps here."""
    if (REPO / "models" / "lung_nodule_ct" / "metadata.json").is_file():
        return REPO / "models"
    return request.getfixturevalue("smoke_models_dir")


@dataclass
class StoreSCP:
    proc: subprocess.Popen
    port: int
    ae_title: str
    out_dir: Path

    def datasets(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.out_dir.rglob("*")) if p.is_file()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def start_storescp(out_dir: Path, ae_title: str = "DEST", port: int | None = None) -> StoreSCP:
    """dcmtk storescp as an independent destination, accepting every storage SOP class."""
    exe = require_tool("storescp")
    out_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proc = subprocess.Popen([exe, "-aet", ae_title, "-od", str(out_dir), "--accept-all", "-uf", str(port)],
                            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_echo(port, ae_title)
    return StoreSCP(proc, port, ae_title, out_dir)


def wait_for_echo(port: int, ae_title: str, timeout: float = 20.0) -> None:
    exe = require_tool("echoscu")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run([exe, "-aec", ae_title, "127.0.0.1", str(port)], capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"no C-ECHO answer on port {port}")


def storescu(files_or_dir: Path, port: int, called: str, calling: str = "PACS", *extra: str,
             check: bool = True) -> subprocess.CompletedProcess:
    exe = require_tool("storescu")
    args = [exe, "-v", "-aet", calling, "-aec", called, *extra]
    if files_or_dir.is_dir():
        args += ["--scan-directories", "--recurse", "--scan-pattern", "*.dcm"]
    args += ["127.0.0.1", str(port), str(files_or_dir)]
    res = subprocess.run(args, env=DCMTK_ENV, capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"storescu failed ({res.returncode}): {res.stderr[-2000:]}")
    return res


@pytest.fixture
def storescp_dest(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = start_storescp(tmp_path / "dest")
    yield scp
    scp.stop()
