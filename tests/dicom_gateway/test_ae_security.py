"""Who may associate: the called AE title, the calling AE allow-list bound to hosts, association limits
per calling AE and per host, an association's lifetime, and the refusal of an exposed plain bind.

Peers are dcmtk echoscu and pynetdicom SCUs on loopback; every refusal is an A-ASSOCIATE-RJ with the
result, source and reason of PS3.8 Table 9-21, logged with AE title and peer address.
"""

from __future__ import annotations

import logging
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_gateway.settings import Settings
from harness.dcmtk import run_echoscu
from harness.gateway import REPO, write_config
from harness.system import free_port
from tests.dicom_gateway.stores import closed_associations

pytestmark = pytest.mark.integration


@pytest.fixture
def refusals(caplog: pytest.LogCaptureFixture) -> Callable[[], list[logging.LogRecord]]:
    """The "association refused" log records so far."""
    caplog.set_level(logging.INFO, logger="dxgate")
    return lambda: [r for r in caplog.records if r.getMessage() == "association refused"]


def _associate(port: int, calling_ae: str, called_ae: str = "DXGATE") -> Association:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    return ae.associate("127.0.0.1", port, ae_title=called_ae)


def _rejection(assoc: Association) -> tuple[int, int, int]:
    assert assoc.is_rejected, "expected A-ASSOCIATE-RJ"
    rj = assoc.acceptor.primitive
    return (rj.result, rj.result_source, rj.diagnostic)


def test_wrong_called_ae_is_rejected(scp_factory, refusals) -> None:
    scp = scp_factory()
    res = run_echoscu(scp.port, "NOT_DXGATE", calling_ae="PACS")
    assert res.returncode != 0 and "Called AE Title Not Recognized" in res.stderr
    assert _rejection(_associate(scp.port, "PACS", called_ae="OTHER")) == (0x01, 0x01, 0x07)
    (log1, log2) = refusals()
    assert (log1.calling_ae, log1.called_ae, log1.peer) == ("PACS", "NOT_DXGATE", "127.0.0.1")
    assert log1.status == "A-ASSOCIATE-RJ 1/1/7"
    assert run_echoscu(scp.port, "DXGATE", calling_ae="PACS").returncode == 0


def test_calling_ae_not_allowed_is_rejected(scp_factory, refusals) -> None:
    scp = scp_factory(allowed_calling_aes=["PACS"])
    res = run_echoscu(scp.port, "DXGATE", calling_ae="INTRUDER")
    assert res.returncode != 0 and "Calling AE Title Not Recognized" in res.stderr
    assert run_echoscu(scp.port, "DXGATE", calling_ae="PACS").returncode == 0
    (log,) = refusals()
    assert log.calling_ae == "INTRUDER" and "not in allowed_calling_aes" in log.reason and log.peer == "127.0.0.1"
    assert [r["calling_ae"] for r in scp.store.db.query("SELECT calling_ae FROM associations")] == ["PACS"]


def test_calling_ae_bound_to_hosts(scp_factory, refusals) -> None:
    scp = scp_factory(allowed_calling_aes=["PACS", {"ae_title": "CT01", "hosts": ["127.0.0.1"]},
                                           {"ae_title": "CT02", "hosts": ["10.0.0.5"]},
                                           {"ae_title": "CT03", "hosts": ["127.0.0.0/8"]}])
    assert run_echoscu(scp.port, "DXGATE", calling_ae="CT01").returncode == 0
    assert run_echoscu(scp.port, "DXGATE", calling_ae="CT03").returncode == 0
    assert _rejection(_associate(scp.port, "CT02")) == (0x01, 0x01, 0x03)
    (log,) = refusals()
    assert log.calling_ae == "CT02" and "not allowed from this address" in log.reason
    assert log.peer == "127.0.0.1"


def test_associations_per_calling_ae_are_limited(scp_factory, refusals) -> None:
    scp = scp_factory(limits={"max_associations_per_ae": 2, "max_associations_per_host": 10})
    held = [_associate(scp.port, "PACS") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        assert _rejection(_associate(scp.port, "PACS")) == (0x02, 0x03, 0x02)  # transient, local limit exceeded
        other = _associate(scp.port, "CT01")  # another AE from the same host is not affected
        assert other.is_established
        other.release()
        (log,) = refusals()
        assert log.calling_ae == "PACS" and "max_associations_per_ae" in log.reason
    finally:
        for a in held:
            a.release()
    again = _associate(scp.port, "PACS")  # released: admitted again
    assert again.is_established
    again.release()


def test_associations_per_host_are_limited(scp_factory, refusals) -> None:
    scp = scp_factory(limits={"max_associations_per_ae": 10, "max_associations_per_host": 2})
    held = [_associate(scp.port, "CT01"), _associate(scp.port, "CT02")]
    try:
        assert all(a.is_established for a in held)
        assert _rejection(_associate(scp.port, "CT03")) == (0x02, 0x03, 0x02)
        (log,) = refusals()
        assert "host 127.0.0.1" in log.reason and "max_associations_per_host" in log.reason
    finally:
        for a in held:
            a.release()
    assert run_echoscu(scp.port, "DXGATE", calling_ae="CT03").returncode == 0


def test_an_association_older_than_the_limit_is_aborted(scp_factory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dxgate.admission")
    scp = scp_factory(limits={"max_association_seconds": 1.0})
    assoc = _associate(scp.port, "SLOW")
    assert assoc.is_established
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.1)
    assert assoc.is_aborted
    rows = closed_associations(scp.store, timeout_s=5)
    assert [(bool(r["closed_at"]), r["aborted"]) for r in rows] == [(True, 1)]
    (log,) = [r for r in caplog.records if r.getMessage() == "association aborted"]
    assert log.calling_ae == "SLOW" and "limits.max_association_seconds" in log.reason
    assert run_echoscu(scp.port, "DXGATE").returncode == 0  # a short one is not affected


def test_plain_port_off_loopback_without_allow_list_warns(scp_factory, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from harness.tls import make_test_pki

    pki = make_test_pki(tmp_path / "pki")
    caplog.set_level(logging.WARNING, logger="dxgate.scp")
    scp_factory(bind_address="0.0.0.0", tls={"port": free_port(), "cert_file": str(pki.server_cert),
                                             "key_file": str(pki.server_key)})
    (log,) = [r for r in caplog.records if r.getMessage() == "plain DICOM port open to the network"]
    assert "allowed_calling_aes" in log.reason and "dicom_port: 0" in log.reason


def test_serve_refuses_an_exposed_bind_naming_the_keys(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "models", rules=[])
    cfg = yaml.safe_load(config.read_text())
    cfg["bind_address"] = "0.0.0.0"
    config.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "dxgate", "serve", "--config", str(config)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    for key in ("bind_address", "allowed_calling_aes", "tls", "insecure"):
        assert key in res.stderr, res.stderr
    cfg["insecure"] = True  # the explicit opt-out is accepted by the settings
    assert Settings(**cfg).insecure


def test_a_flood_of_idle_connections_from_one_host_is_closed_at_accept(scp_factory) -> None:
    """Beyond its association limit plus a small slack, a host's connections are closed before a thread is
    started for them, so a flood cannot hold the SCP's association slots until the ARTIM timers expire."""
    from dicom_gateway.receive.listeners import CONNECTION_SLACK
    from harness.hostile import idle_connections

    per_host = 2
    scp = scp_factory(limits={"max_associations_per_host": per_host})  # ARTIM timer: network_timeout_s 5 s
    socks = idle_connections(scp.port, 20)
    try:
        time.sleep(1.0)  # closes at accept come at once; the held ones wait for an A-ASSOCIATE-RQ
        readable, _, _ = select.select(socks, [], [], 0)
        closed = sum(1 for s in readable if s.recv(1) == b"")
        assert closed == len(socks) - (per_host + CONNECTION_SLACK)
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 20
    while run_echoscu(scp.port, "DXGATE", calling_ae="CT01").returncode != 0:
        assert time.monotonic() < deadline, "the SCP did not admit the host again once its connections closed"
        time.sleep(0.5)
