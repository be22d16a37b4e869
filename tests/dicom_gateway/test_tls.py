"""DICOM over TLS (PS3.15 Annex B) with dcmtk as the peer in both directions, on loopback.

The SCP: echoscu/storescu `+tls` into the Storage SCP and into a real `dxgate serve`; mutual TLS
refuses an untrusted client certificate, no certificate and plain TCP on the TLS port, and answers
afterwards. The sender: C-STORE to dcmtk `storescp +tls`, which verifies our client certificate.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml

from dicom_gateway.errors import ConfigError, DeliveryError
from dicom_gateway.receive.scp import StorageSCP
from dicom_gateway.receive.tls import client_context, server_context
from dicom_gateway.send.scu import store_datasets_or_files
from dicom_gateway.settings import Destination
from dicom_gateway.settings_security import TlsSettings
from harness.ct import write_ct_series
from harness.dcmtk import run_echoscu, run_storescu, storescp
from harness.gateway import REPO, start_gateway, write_config
from harness.system import free_port, system_tool
from harness.tls import TestPki, make_test_pki, run_tls_echoscu, start_tls_storescp, tls_args

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    system_tool("openssl")
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def _tls(pki: TestPki, **kw: object) -> dict:
    return {"port": free_port(), "cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
            "ca_file": str(pki.ca_cert), **kw}


def _associations(scp: StorageSCP) -> list[dict]:
    return [dict(r) for r in scp.store.db.query("SELECT calling_ae, called_ae, tls FROM associations ORDER BY id")]


def test_plain_and_tls_listeners_side_by_side(pki: TestPki, scp_factory) -> None:
    scp = scp_factory(tls=_tls(pki))
    assert scp.tls_port != scp.port
    res = run_tls_echoscu(scp.tls_port, "DXGATE", pki.client_key, pki.client_cert, pki.ca_cert, calling_ae="SECURE")
    assert res.returncode == 0, res.stderr
    res = run_echoscu(scp.port, "DXGATE", calling_ae="PLAIN")
    assert res.returncode == 0, res.stderr
    assert _associations(scp) == [{"calling_ae": "SECURE", "called_ae": "DXGATE", "tls": 1},
                                  {"calling_ae": "PLAIN", "called_ae": "DXGATE", "tls": 0}]


def test_storescu_over_tls_stores_every_instance(pki: TestPki, scp_factory, tmp_path: Path) -> None:
    scp = scp_factory(tls=_tls(pki))
    files = write_ct_series(tmp_path / "ct", 3)
    res = run_storescu(files, scp.tls_port, "DXGATE", calling_ae="PACS",
                       extra=tls_args(pki.client_key, pki.client_cert, pki.ca_cert))
    assert res.returncode == 0, res.stderr
    rows = scp.store.db.query("SELECT i.sop_instance_uid, a.tls FROM instances i JOIN associations a "
                              "ON a.id = i.association_id")
    assert len(rows) == 3 and all(r["tls"] == 1 for r in rows)


def test_mutual_tls_refuses_untrusted_anonymous_and_plain_clients(pki: TestPki, scp_factory,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dxgate.scp")
    scp = scp_factory(tls=_tls(pki, require_client_cert=True))
    untrusted = run_tls_echoscu(scp.tls_port, "DXGATE", pki.untrusted_client_key, pki.untrusted_client_cert,
                                pki.ca_cert)
    assert untrusted.returncode != 0
    anonymous = subprocess.run([system_tool("echoscu"), "-to", "5", "+tla", "+cf", str(pki.ca_cert),
                                "-aec", "DXGATE", "127.0.0.1", str(scp.tls_port)],
                               capture_output=True, text=True, timeout=20)
    assert anonymous.returncode != 0
    plain = run_echoscu(scp.tls_port, "DXGATE")
    assert plain.returncode != 0
    refused = [r for r in caplog.records if r.getMessage() == "TLS handshake refused"]
    assert len(refused) == 3 and all("from 127.0.0.1" in r.reason for r in refused)
    assert _associations(scp) == []  # none got as far as an association
    res = run_tls_echoscu(scp.tls_port, "DXGATE", pki.client_key, pki.client_cert, pki.ca_cert)
    assert res.returncode == 0, res.stderr  # still answers
    assert run_echoscu(scp.port, "DXGATE").returncode == 0


def test_a_silent_tcp_client_on_the_tls_port_does_not_block_others(pki: TestPki, scp_factory) -> None:
    import socket

    scp = scp_factory(tls=_tls(pki))
    with socket.create_connection(("127.0.0.1", scp.tls_port)):  # connects, never says a word
        res = run_tls_echoscu(scp.tls_port, "DXGATE", pki.client_key, pki.client_cert, pki.ca_cert)
    assert res.returncode == 0, res.stderr


def test_tls_only_gateway_takes_storescu_tls(pki: TestPki, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """`dxgate serve` with dicom_port: 0 and two receiver processes sharing the TLS port (SO_REUSEPORT):
    DICOM over TLS only; plain TCP on the TLS port is refused."""
    models = REPO / "models"
    if not (models / "lung_nodule_ct" / "metadata.json").is_file():
        models = request.getfixturevalue("smoke_models_dir")
    config = write_config(tmp_path, models, rules=[], tls=_tls(pki))
    cfg = yaml.safe_load(config.read_text())
    cfg["dicom_port"] = 0
    cfg["receivers"] = 2
    config.write_text(yaml.safe_dump(cfg))
    gw = start_gateway(config)
    try:
        port = cfg["tls"]["port"]
        files = write_ct_series(tmp_path / "ct", 2)
        res = run_storescu(files, port, "DXGATE", calling_ae="PACS",
                           extra=tls_args(pki.client_key, pki.client_cert, pki.ca_cert))
        assert res.returncode == 0, res.stderr
        assert run_storescu(files, port, "DXGATE", calling_ae="PACS").returncode != 0
        db = sqlite3.connect(gw.data_dir / "jobs.sqlite3")
        try:
            assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 2
        finally:
            db.close()
        listening = [line for line in gw.log().splitlines() if "storage SCP listening" in line]
        assert len(listening) == 2  # one per receiver
        assert all(f":{port} (TLS)" in line and line.count("127.0.0.1:") == 1 for line in listening)
    finally:
        gw.stop()


# -- the sending direction --------------------------------------------------------------------------
def _client_tls(pki: TestPki, ca: Path | None = None) -> TlsSettings:
    return TlsSettings(port=free_port(), cert_file=pki.client_cert, key_file=pki.client_key,
                       ca_file=ca or pki.ca_cert)


def test_sender_stores_to_storescp_over_tls(pki: TestPki, tmp_path: Path) -> None:
    scp = start_tls_storescp(tmp_path / "dest", pki, "DEST")
    try:
        files = write_ct_series(tmp_path / "ct", 3)
        dest = Destination(name="pacs", ae_title="DEST", host="127.0.0.1", port=scp.port, tls=True)
        acknowledged: list[tuple[Path, int]] = []
        statuses = store_datasets_or_files(files, dest, "DXGATE", 10, tls=_client_tls(pki),
                                           on_stored=lambda p, s: acknowledged.append((p, s)))
        assert statuses == [(f, 0) for f in files]
        assert acknowledged == statuses
        assert len(scp.files()) == 3
    finally:
        scp.stop()


def test_sender_refuses_a_destination_it_cannot_verify(pki: TestPki, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "ct", 1)
    scp = start_tls_storescp(tmp_path / "dest", pki, "DEST")
    try:
        dest = Destination(name="pacs", ae_title="DEST", host="127.0.0.1", port=scp.port, tls=True)
        with pytest.raises(DeliveryError, match="TLS"):  # trusts only the other CA
            store_datasets_or_files(files, dest, "DXGATE", 5, tls=_client_tls(pki, ca=pki.untrusted_ca_cert))
        with pytest.raises(ConfigError, match="tls"):
            store_datasets_or_files(files, dest, "DXGATE", 5, tls=None)
        assert scp.files() == []
    finally:
        scp.stop()
    with storescp(tmp_path / "plain", "DEST") as plain:  # tls: true to a plain-TCP peer fails, never falls back
        dest = Destination(name="pacs", ae_title="DEST", host="127.0.0.1", port=plain.port, tls=True)
        with pytest.raises(DeliveryError):
            store_datasets_or_files(files, dest, "DXGATE", 5, tls=_client_tls(pki))
        assert plain.files() == []


def test_contexts_require_tls_12_and_name_unreadable_files(pki: TestPki, tmp_path: Path) -> None:
    import ssl

    tls = TlsSettings(**_tls(pki))
    assert server_context(tls).minimum_version == ssl.TLSVersion.TLSv1_2
    assert server_context(tls).verify_mode == ssl.CERT_OPTIONAL
    assert server_context(tls.model_copy(update={"require_client_cert": True})).verify_mode == ssl.CERT_REQUIRED
    assert server_context(tls.model_copy(update={"ca_file": None})).verify_mode == ssl.CERT_NONE
    ctx = client_context(tls)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    with pytest.raises(ConfigError, match="tls.key_file"):
        server_context(tls.model_copy(update={"key_file": tmp_path / "missing.key"}))
    with pytest.raises(ConfigError, match="tls.ca_file"):
        client_context(tls.model_copy(update={"ca_file": tmp_path / "missing.pem"}))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="tls.cert_file"):
        server_context(tls.model_copy(update={"cert_file": garbage}))


def test_dxgate_send_over_tls(pki: TestPki, tmp_path: Path) -> None:
    """`dxgate send +tls KEY CERT +cf CA`, storescu's spelling, to dcmtk storescp +tls."""
    import sys

    scp = start_tls_storescp(tmp_path / "dest", pki, "DEST")
    try:
        files = write_ct_series(tmp_path / "ct", 2)
        res = subprocess.run([sys.executable, "-m", "dxgate", "send", "+tls", str(pki.client_key),
                              str(pki.client_cert), "+cf", str(pki.ca_cert), "-aec", "DEST", "127.0.0.1",
                              str(scp.port), str(tmp_path / "ct")], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "sent 2, failed 0" in res.stdout and len(scp.files()) == 2
        res = subprocess.run([sys.executable, "-m", "dxgate", "send", "-aec", "DEST", "127.0.0.1", str(scp.port),
                              str(files[0])], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert res.returncode != 0  # plain TCP to a TLS peer
    finally:
        scp.stop()
