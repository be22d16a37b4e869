"""Bounded receive against a real Storage SCP on loopback: hand-made PDUs on a raw socket, pynetdicom as SCU.

PDU length over max_pdu, data set over limits.max_dataset_mb, a Deflate bomb, deep sequence nesting and a
declared length beyond what is sent: each is refused (A-ABORT, 0xA700 or 0xC210) without holding what the
peer claims, and the server goes on storing and answering C-ECHO.
"""

from __future__ import annotations

import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association

from dicom_gateway.errors import DatasetTooLargeError, UnparsableDatasetError
from dicom_gateway.receive.headers import MAX_NESTING, identifiers, parse_dataset_bytes
from dicom_gateway.receive.scp import StorageSCP, file_meta_bytes
from dicom_gateway.receive.spool import Spool, check_uid
from dicom_gateway.settings import Settings
from dicom_gateway.store import Store
from harness.ct import dataset_bytes, make_ct, uids, write_ct, write_ct_series
from harness.dcmtk import run_echoscu, run_storescu
from harness.hostile import ABORT, P_DATA, RawPeer, associate_rq, c_store_rq, p_data, pdu, pdv, uid_value
from harness.payloads import deflate_bomb, element, nested_sequences
from harness.system import free_port
from tests.dicom_gateway.stores import closed_associations

pytestmark = pytest.mark.integration


# -- a raw DICOM peer (harness.hostile, PS3.8 9.3) -----------------------------------------------
def _peer(port: int) -> RawPeer:
    """A raw peer with an A-ASSOCIATE-AC for CT Image Storage, Explicit VR LE as context 1 (calling RAWPEER)."""
    peer = RawPeer(port, timeout_s=20)
    assert peer.associate("DXGATE", "RAWPEER").ok, "expected A-ASSOCIATE-AC"
    return peer


def _next_pdu_type(peer: RawPeer) -> int | None:
    """The type of the next PDU the SCP sends; None when it closed the connection (or timed out)."""
    got = peer.read_pdu()
    return None if got is None else got[0]


def _command(sop_uid: str) -> bytes:
    """A P-DATA-TF PDU carrying a whole C-STORE-RQ command set for a CT image on context 1."""
    return p_data(pdv(1, c_store_rq(CTImageStorage, sop_uid), command=True, last=True))


# -- the SCP under test ---------------------------------------------------------------------------
class Gateway:
    def __init__(self, tmp_path: Path, **overrides: object) -> None:
        overrides.setdefault("network_timeout_s", 30)  # long: a read of the announced length would hang
        self.settings = Settings(data_dir=tmp_path / "var", dicom_port=free_port(), fsync=False, **overrides)
        self.store = Store(self.settings.db_path, durable=False)
        self.spool = Spool(self.settings.spool_dir, fsync=False)
        self.scp = StorageSCP(self.settings, self.store, self.spool)
        self.scp.start()

    @property
    def port(self) -> int:
        return self.scp.port

    def sops(self) -> set[str]:
        return {r["sop_instance_uid"] for r in self.store.db.query("SELECT sop_instance_uid FROM instances")}

    def echo(self) -> None:
        res = run_echoscu(self.port, "DXGATE", calling_ae="CHECK")
        assert res.returncode == 0, res.stderr


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(tmp_path, max_pdu=16384, limits={"max_dataset_mb": 16})
    yield gw
    gw.scp.stop()


def _scu(port: int, transfer_syntax: str = ExplicitVRLittleEndian) -> Association:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, [transfer_syntax])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="DXGATE")
    assert assoc.is_established
    return assoc


def _raw_file(path: Path, sop_uid: str, transfer_syntax: str, body: bytes) -> Path:
    """A Part 10 file whose data set is `body` as given (sent raw with STORE_SEND_CHUNKED_DATASET)."""
    path.write_bytes(file_meta_bytes(CTImageStorage, sop_uid, transfer_syntax, sending_ae=None,
                                     receiving_ae="TEST") + body)
    return path


def _identifiers(sop_uid: str, study_uid: str | None = None) -> bytes:
    """Explicit VR LE elements: SOP Class/Instance, Study and Series Instance UIDs (in tag order)."""
    values = ((0x0008, 0x0016, CTImageStorage), (0x0008, 0x0018, sop_uid),
              (0x0020, 0x000D, study_uid or generate_uid()), (0x0020, 0x000E, generate_uid()))
    return b"".join(element(group, elem, "UI", uid_value(value)) for group, elem, value in values)


def _deflate_bomb(inflated_gib: int) -> bytes:
    """A raw deflate stream of identifiers then OB elements of zeros: about 1 KiB per inflated MiB."""
    return deflate_bomb(_identifiers(generate_uid()), inflated_gib << 30)


# -- PDU cap --------------------------------------------------------------------------------------
def test_p_data_announcing_4_gib_is_aborted_before_its_body_is_read(gateway: Gateway) -> None:
    with _peer(gateway.port) as peer:
        t0 = time.monotonic()
        assert peer.send(pdu(P_DATA, bytes(100), length=0xFFFFFFFF))  # 100 of 4 GiB sent
        pdu_type = _next_pdu_type(peer)  # without the cap the SCP would wait for the rest (30 s timeout)
        assert pdu_type == ABORT, "expected A-ABORT"
        assert time.monotonic() - t0 < 10
        t0 = time.monotonic()  # then closed: None well before the peer's 20 s read timeout
        assert peer.read_pdu() is None and time.monotonic() - t0 < 10, "the connection stayed open"
    gateway.echo()
    rows = closed_associations(gateway.store, "RAWPEER")
    assert [r["aborted"] for r in rows] == [1]


def test_p_data_just_over_max_pdu_is_aborted_and_at_max_pdu_is_read(gateway: Gateway) -> None:
    with _peer(gateway.port) as peer:
        command = _command(generate_uid())
        assert len(command) - 6 <= gateway.settings.max_pdu
        assert peer.send(command)
        assert peer.send(pdu(P_DATA, b"", length=gateway.settings.max_pdu + 1))
        assert _next_pdu_type(peer) == ABORT
    gateway.echo()


def test_senders_that_keep_to_max_pdu_are_unaffected(tmp_path: Path) -> None:
    """dcmtk and pynetdicom fragment to exactly the Maximum Length we announce: never refused."""
    gw = Gateway(tmp_path, max_pdu=4096)
    try:
        files = write_ct_series(tmp_path / "in", 2, rows=64, columns=64)  # 8 KiB of pixels each
        res = run_storescu(files, gw.port, "DXGATE", calling_ae="PACS")
        assert res.returncode == 0, res.stderr
        assoc = _scu(gw.port)
        try:
            ds = make_ct(rows=64, columns=64)
            assert assoc.send_c_store(ds).Status == 0x0000
        finally:
            assoc.release()
        assert gw.sops() == {*uids(files), ds.SOPInstanceUID}
    finally:
        gw.scp.stop()


@pytest.mark.parametrize("sent", [associate_rq("DXGATE", "RAWPEER", length=0xFFFFFFFF)[:200],  # 4 GiB
                                  pdu(0x09, bytes(range(256)) * 64, length=0x10)],  # unknown PDU type
                         ids=["4-GiB-A-ASSOCIATE-RQ", "unknown-PDU-type"])
def test_association_request_announcing_4_gib_or_garbage_is_aborted(gateway: Gateway, sent: bytes) -> None:
    with RawPeer(gateway.port, timeout_s=20) as peer:
        assert peer.send(sent)
        assert _next_pdu_type(peer) == ABORT
    gateway.echo()


# -- data set cap ---------------------------------------------------------------------------------
def _stream_data_set(peer: RawPeer, mib: int, answer: Callable[[], int | None]) -> tuple[int | None, int]:
    """Send `mib` MiB of data set fragments (16 KiB PDUs) and read the answer; (answer, peak traced bytes)."""
    fragment = bytes(16376)  # one PDV per PDU within the 16384 our A-ASSOCIATE-RQ announced
    tracemalloc.start()
    try:
        for _ in range(mib * 64 - 1):
            assert peer.send(p_data(pdv(1, fragment, command=False, last=False)))
        assert peer.send(p_data(pdv(1, fragment, command=False, last=True)))
        result = answer()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_data_set_over_the_limit_is_answered_a700_without_being_held(tmp_path: Path) -> None:
    """48 MiB streamed against a 1 MiB cap: 0xA700, the SCP's allocations stay far below what was sent."""
    gw = Gateway(tmp_path, max_pdu=262144, limits={"max_dataset_mb": 1})
    with _peer(gw.port) as peer:
        assert peer.send(_command(generate_uid()))
        status, peak = _stream_data_set(peer, 48, peer.read_status)
        assert status == 0xA700
        assert peak < 12 << 20, f"peak traced allocation {peak} bytes"
    with _peer(gw.port) as peer:  # data fragments with no command before them: bounded too, then aborted
        pdu_type, peak = _stream_data_set(peer, 16, lambda: _next_pdu_type(peer))
        assert pdu_type == ABORT
        assert peak < 12 << 20, f"peak traced allocation {peak} bytes"
    try:
        assoc = _scu(gw.port)  # pynetdicom: over the cap, then a normal instance on the same association
        try:
            big = make_ct()
            big.EncapsulatedDocument = bytes(2 << 20)
            assert assoc.send_c_store(big).Status == 0xA700
            ok = make_ct()
            assert assoc.send_c_store(ok).Status == 0x0000
        finally:
            assoc.release()
        assert gw.sops() == {ok.SOPInstanceUID}
        assert [p for p in gw.spool.root.rglob("*") if p.is_file()] == [
            gw.spool.path_for(ok.StudyInstanceUID, ok.SeriesInstanceUID, ok.SOPInstanceUID)]
    finally:
        gw.scp.stop()


def test_deflate_bomb_is_answered_a700_quickly(gateway: Gateway, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """About 10 MiB on the wire that would inflate to 10 GiB, against a 16 MiB cap."""
    bomb = _deflate_bomb(10)
    assert len(bomb) < gateway.settings.limits.max_dataset_bytes
    sop = generate_uid()
    path = _raw_file(tmp_path / "bomb.dcm", sop, DeflatedExplicitVRLittleEndian, bomb)
    good = make_ct()
    good.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    good_path = tmp_path / "good.dcm"
    good.save_as(good_path, enforce_file_format=True)
    assoc = _scu(gateway.port, DeflatedExplicitVRLittleEndian)
    try:
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        t0 = time.monotonic()
        assert assoc.send_c_store(path).Status == 0xA700
        assert time.monotonic() - t0 < 20
        assert assoc.send_c_store(good_path).Status == 0x0000  # a sane Deflated instance is stored
    finally:
        assoc.release()
    assert gateway.sops() == {good.SOPInstanceUID}
    gateway.echo()


def test_inflate_is_bounded_and_a_sane_deflated_data_set_parses(tmp_path: Path) -> None:
    with pytest.raises(DatasetTooLargeError):
        parse_dataset_bytes(_deflate_bomb(1), DeflatedExplicitVRLittleEndian, max_bytes=1 << 20)
    sop = pydicom.dcmread(write_ct(tmp_path / "ct.dcm")).SOPInstanceUID
    plain = dataset_bytes(tmp_path / "ct.dcm")
    z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = z.compress(plain) + z.flush()
    parsed = parse_dataset_bytes(deflated, DeflatedExplicitVRLittleEndian, max_bytes=len(plain))
    assert parsed.SOPInstanceUID == sop
    with pytest.raises(DatasetTooLargeError):  # inflated, one byte over
        parse_dataset_bytes(deflated, DeflatedExplicitVRLittleEndian, max_bytes=len(plain) - 1)
    with pytest.raises(UnparsableDatasetError, match="truncated"):
        parse_dataset_bytes(deflated[: len(deflated) // 2], DeflatedExplicitVRLittleEndian, max_bytes=1 << 20)
    with pytest.raises(DatasetTooLargeError):  # the received bytes themselves over the cap
        parse_dataset_bytes(plain, ExplicitVRLittleEndian, max_bytes=len(plain) - 1)


# -- malformed structure --------------------------------------------------------------------------
def test_deep_nesting_a_declared_length_beyond_the_data_and_a_bad_uid_are_c210(gateway: Gateway, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    nested_sop, long_sop = generate_uid(), generate_uid()
    nested = _raw_file(tmp_path / "nested.dcm", nested_sop, ExplicitVRLittleEndian,
                       _identifiers(nested_sop) + nested_sequences(10_000))
    lying = element(0x0042, 0x0011, "OB", bytes(64), length=0x7FFFFFF0)  # declares 2 GiB, carries 64 bytes
    overlong = _raw_file(tmp_path / "long.dcm", long_sop, ExplicitVRLittleEndian, _identifiers(long_sop) + lying)
    bad_sop = generate_uid()
    bad_uid = _raw_file(tmp_path / "bad_uid.dcm", bad_sop, ExplicitVRLittleEndian, _identifiers(bad_sop, "1.2.3\n"))
    assoc = _scu(gateway.port)
    try:
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        assert assoc.send_c_store(nested).Status == 0xC210
        assert assoc.send_c_store(overlong).Status == 0xC210
        assert assoc.send_c_store(bad_uid).Status == 0xC210
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)
        ok = make_ct()
        assert assoc.send_c_store(ok).Status == 0x0000
    finally:
        assoc.release()
    assert gateway.sops() == {ok.SOPInstanceUID}
    gateway.echo()


@pytest.mark.parametrize("study_uid", ["../x", "1.2/3", "1.2.3\n", "1." + "2" * 63, "1.2\x003", "1.2\\3.4"])
def test_malformed_uids_are_refused_not_tidied(study_uid: str) -> None:
    """Only NUL/space padding is removed (PS3.5 9.1): pydicom's own stripping must not make these valid."""
    sop = generate_uid()
    ds = parse_dataset_bytes(_identifiers(sop, study_uid), ExplicitVRLittleEndian)
    study, _, _ = identifiers(ds)
    with pytest.raises(UnparsableDatasetError, match="not a valid UID"):
        check_uid(study)
    assert identifiers(parse_dataset_bytes(_identifiers(sop, "1.2.3\0"), ExplicitVRLittleEndian))[0] == "1.2.3"


def test_nesting_cap_holds_below_the_parsers_recursion_limit() -> None:
    sop = generate_uid()
    with pytest.raises(UnparsableDatasetError, match=f"nested deeper than {MAX_NESTING}"):
        parse_dataset_bytes(_identifiers(sop) + nested_sequences(MAX_NESTING + 1), ExplicitVRLittleEndian)
    assert parse_dataset_bytes(_identifiers(sop) + nested_sequences(8), ExplicitVRLittleEndian).SOPInstanceUID == sop
