"""docs/security.md's certificate recipe works as written: its openssl commands make a CA and certificates with
which a TLS-only, mutual-TLS Storage SCP answers dcmtk `echoscu +tls` from the documented PACS identity."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dicom_gateway.receive.scp import StorageSCP
from dicom_gateway.receive.spool import Spool
from dicom_gateway.settings import Settings
from dicom_gateway.store import Store
from harness.system import free_port, system_tool
from harness.tls import run_tls_echoscu
from tests.doc_blocks import REPO, block_under

pytestmark = pytest.mark.integration


def test_the_documented_certificates_serve_mutual_tls(tmp_path: Path) -> None:
    system_tool("openssl")
    block = block_under(REPO / "docs" / "security.md", "Certificates with openssl")
    pki = tmp_path / "tls"
    pki.mkdir()
    res = subprocess.run(["bash", "-e", "-c", block], cwd=pki, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "dxgate.crt: OK" in res.stdout and "pacs.crt: OK" in res.stdout
    settings = Settings(data_dir=tmp_path / "var", dicom_port=0, network_timeout_s=5,
                        tls={"port": free_port(), "cert_file": pki / "dxgate.crt", "key_file": pki / "dxgate.key",
                             "ca_file": pki / "ca.crt", "require_client_cert": True},
                        allowed_calling_aes=[{"ae_title": "PACS", "hosts": ["127.0.0.1"]}])
    scp = StorageSCP(settings, Store(settings.db_path), Spool(settings.spool_dir, fsync=False))
    scp.start()
    try:
        ok = run_tls_echoscu(scp.tls_port, "DXGATE", pki / "pacs.key", pki / "pacs.crt", pki / "ca.crt",
                             calling_ae="PACS")
        assert ok.returncode == 0, ok.stderr
        wrong_ae = run_tls_echoscu(scp.tls_port, "DXGATE", pki / "pacs.key", pki / "pacs.crt", pki / "ca.crt",
                                   calling_ae="OTHER")
        assert wrong_ae.returncode != 0
    finally:
        scp.stop()
