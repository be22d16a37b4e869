"""Hostile peers at the upper layer (PS3.8 9.3): garbage, lying lengths, slow and idle peers, AE checks."""

from __future__ import annotations

import os
import resource
import select
import struct
import time

import pytest
from pydicom.uid import generate_uid

from harness.gateway import RunningGateway
from harness.hostile import (
    CT_IMAGE_STORAGE,
    P_DATA,
    VERIFICATION,
    RawPeer,
    associate_rq,
    c_echo_rq,
    c_store_rq,
    encode_dataset,
    idle_connections,
    p_data,
    pdu,
    pdv,
    release_rq,
)
from tests.hostile.support import SUCCESS, assert_alive, assert_kept, assert_not_stored, ct, open_peer, wait_outcome

pytestmark = pytest.mark.integration

NETWORK_TIMEOUT_S = 5  # the suite's network_timeout_s (conftest)


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS), MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_garbage_bytes_are_dropped(gw: RunningGateway) -> None:
    with RawPeer(gw.dicom_port) as peer:
        peer.send(bytes([0x09]) + os.urandom(4095))
        assert peer.wait_closed(NETWORK_TIMEOUT_S * 3) is not None
    assert_alive(gw)


def test_unknown_pdu_type_is_dropped(gw: RunningGateway) -> None:
    with RawPeer(gw.dicom_port) as peer:
        peer.send(pdu(0x55, b"\x00" * 16))
        assert peer.wait_closed(NETWORK_TIMEOUT_S * 3) is not None
    assert_alive(gw)


def test_p_data_before_association_is_dropped(gw: RunningGateway) -> None:
    with RawPeer(gw.dicom_port) as peer:
        peer.send(p_data(pdv(1, c_echo_rq(), command=True, last=True)))
        assert peer.wait_closed(NETWORK_TIMEOUT_S * 3) is not None
    assert_alive(gw)


def test_release_in_the_middle_of_a_c_store(gw: RunningGateway) -> None:
    ds = ct()
    data = encode_dataset(ds)
    peer, cx = open_peer(gw)
    with peer:
        peer.send(p_data(pdv(cx, c_store_rq(CT_IMAGE_STORAGE, str(ds.SOPInstanceUID)), command=True, last=True)))
        peer.send(p_data(pdv(cx, data[: len(data) // 2], command=False, last=False)))
        peer.send(release_rq())
        got = peer.read_pdu(timeout_s=NETWORK_TIMEOUT_S * 3)
        assert got is None or got[0] in (6, 7), got  # released or aborted, never a C-STORE-RSP success
    assert_not_stored(gw, [str(ds.SOPInstanceUID)])
    assert_alive(gw)


def test_p_data_announcing_4_gib_is_aborted_before_allocation(gw: RunningGateway) -> None:
    before = rss_mb(gw.pid)
    peer, _ = open_peer(gw)
    with peer:
        peer.send(struct.pack(">BBI", P_DATA, 0, 0xFFFFFFFF) + b"\x00" * 64)
        closed = peer.wait_closed(NETWORK_TIMEOUT_S * 3)
    assert closed is not None, "the association stayed open"
    assert closed < NETWORK_TIMEOUT_S, f"dropped after {closed:.1f}s: by the network timeout, not by max_pdu"
    assert rss_mb(gw.pid) - before < 200
    assert_alive(gw)


def test_p_data_over_max_pdu_is_aborted(gw: RunningGateway) -> None:
    ds = ct(rows=512, columns=512)
    peer, cx = open_peer(gw)
    with peer:
        peer.send(p_data(pdv(cx, c_store_rq(CT_IMAGE_STORAGE, str(ds.SOPInstanceUID)), command=True, last=True)))
        peer.send(p_data(pdv(cx, encode_dataset(ds), command=False, last=True)))  # ~512 KiB > max_pdu 256 KiB
        assert peer.read_status(timeout_s=NETWORK_TIMEOUT_S * 3) is None  # aborted, no status
    assert_not_stored(gw, [str(ds.SOPInstanceUID)])
    assert_alive(gw)


def test_slow_peer_one_byte_every_10_s_is_dropped(gw: RunningGateway) -> None:
    with RawPeer(gw.dicom_port) as peer:
        dropped = peer.trickle(associate_rq(gw.ae_title, "HOSTILE"), interval_s=10, timeout_s=25)
        assert_alive(gw)  # others are served meanwhile
    assert dropped is not None, "a peer sending one byte every 10 s was never dropped"


def test_slow_peer_inside_an_association_is_dropped(gw: RunningGateway) -> None:
    peer, cx = open_peer(gw)
    with peer:
        message = p_data(pdv(cx, c_store_rq(CT_IMAGE_STORAGE, generate_uid()), command=True, last=True))
        dropped = peer.trickle(message, interval_s=10, timeout_s=25)
    assert dropped is not None, "a peer sending one byte every 10 s was never dropped"
    assert_alive(gw)


def test_1000_connections_that_never_associate(gw: RunningGateway) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:  # the client side needs 1000 sockets of its own
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    socks = idle_connections(gw.dicom_port, 1000)
    try:
        assert len(socks) == 1000, f"only {len(socks)} connections were accepted"
        assert gw.api("/healthz") is not None
        poller = select.poll()
        for s in socks:
            poller.register(s, select.POLLIN | select.POLLHUP | select.POLLERR)
        still, deadline = {s.fileno() for s in socks}, time.monotonic() + NETWORK_TIMEOUT_S * 6
        while still and time.monotonic() < deadline:
            for fd, _ in poller.poll(500):  # readable: closed by the server (EOF) or reset
                if fd in still:
                    still.discard(fd)
                    poller.unregister(fd)
        assert not still, f"{len(still)} idle connections still held after {NETWORK_TIMEOUT_S * 6}s"
    finally:
        for s in socks:
            s.close()
    assert_alive(gw)


def test_17_associations_over_a_limit_of_16(gw: RunningGateway) -> None:
    peers = [RawPeer(gw.dicom_port) for _ in range(17)]
    try:
        answers = [p.associate(gw.ae_title, "FLOOD", ((VERIFICATION, ("1.2.840.10008.1.2",)),)) for p in peers]
        accepted = [a for a in answers if a.ok]
        rejected = [a.rejected for a in answers if a.rejected]
        assert len(accepted) == 16, answers
        assert len(rejected) == 1 and rejected[0][0] == 2, rejected  # result 2: rejected-transient
        for p, a in zip(peers, answers, strict=True):
            if a.ok:
                assert p.c_echo(a.accepted[VERIFICATION]) == SUCCESS
    finally:
        for p in peers:
            p.release()
            p.close()
    assert_alive(gw)


@pytest.mark.parametrize(("calling", "called", "reason"), [
    ("INTRUDER", None, 3),  # calling AE title not recognised (PS3.8 9.3.4)
    ("BOUND", None, 3),  # an allowed AE title, bound to another host
    ("HOSTILE", "NOT-DXGATE", 7),  # called AE title not recognised
], ids=["unknown-calling-ae", "calling-ae-from-wrong-host", "wrong-called-ae"])
def test_association_refused(gw: RunningGateway, calling: str, called: str | None, reason: int) -> None:
    with RawPeer(gw.dicom_port) as peer:
        got = peer.associate(called or gw.ae_title, calling)
    assert got.rejected is not None, got
    assert got.rejected[0] == 1 and got.rejected[2] == reason, got.rejected  # permanent
    lines = [line for line in gw.log().splitlines()
             if "refused" in line and f'"{calling}"' in line and "127.0.0.1" in line]
    assert lines, f"no refusal logged with {calling} and its address"
    assert_alive(gw)


def test_association_held_past_its_lifetime_is_aborted(gw: RunningGateway) -> None:
    peer, cx = open_peer(gw, sop_class=VERIFICATION, transfer_syntax="1.2.840.10008.1.2")
    t0 = time.monotonic()
    with peer:
        while time.monotonic() - t0 < 40:
            if peer.c_echo(cx) is None:
                break
            time.sleep(2)
    lasted = time.monotonic() - t0
    assert lasted < 35, "an association kept busy was never ended (max_association_seconds: 20)"
    assert lasted >= 15
    assert_alive(gw)


def test_aborted_association_waits_and_reports_incomplete_series(gw: RunningGateway) -> None:
    study, series = generate_uid(), generate_uid()
    datasets = [ct(study_uid=study, series_uid=series, instance_number=i) for i in range(1, 21)]
    for ds in datasets:
        ds.ImagesInAcquisition = 20
    sent = datasets[:17]
    peer, cx = open_peer(gw)
    with peer:
        statuses = [peer.c_store(cx, CT_IMAGE_STORAGE, str(d.SOPInstanceUID), encode_dataset(d)) for d in sent]
        peer.abort()
    aborted_at = time.monotonic()
    assert statuses == [SUCCESS] * 17
    sop_uids = [str(d.SOPInstanceUID) for d in sent]
    assert_kept(gw, sop_uids, study)
    time.sleep(3)  # quiet_seconds is 1; abort_grace_seconds 6
    early = gw.api(f"/studies/{study}")
    assert early["state"] == "RECEIVING" and not early["jobs"], early
    outcome = wait_outcome(gw, study, timeout_s=60)
    assert time.monotonic() - aborted_at >= 6
    reasons = [outcome["reason"] or ""] + [j["reason"] or "" for j in outcome["jobs"]]
    assert any("incomplete series" in r for r in reasons), outcome
    assert not any(j["state"] == "DONE" for j in outcome["jobs"]), outcome
    assert_alive(gw)
