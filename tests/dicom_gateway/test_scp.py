"""Storage SCP against real peers: dcmtk echoscu/storescu and a pynetdicom SCU, on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLSLossless, RLELossless
from pynetdicom import AE, _config
from pynetdicom.association import Association

from dicom_gateway.receive import spool as spool_module
from dicom_gateway.receive.scp import StorageSCP
from dicom_gateway.receive.spool import Spool
from dicom_gateway.settings import Settings
from dicom_gateway.store import Store
from harness.ct import dataset_bytes, make_ct, write_ct, write_ct_series
from harness.dcmtk import run_echoscu, run_storescu, wait_for_echo
from harness.system import free_port

pytestmark = pytest.mark.integration


@dataclass
class Gateway:
    settings: Settings
    store: Store
    spool: Spool
    scp: StorageSCP

    @property
    def port(self) -> int:
        return self.scp.port

    def instances(self) -> list[dict]:
        return [dict(r) for r in self.store.db.query("SELECT * FROM instances ORDER BY instance_number")]

    def associations(self) -> list[dict]:
        return [dict(r) for r in self.store.db.query("SELECT * FROM associations ORDER BY id")]


def _start(tmp_path: Path, *, min_free_bytes: int = 0, **overrides: object) -> Gateway:
    settings = Settings(data_dir=tmp_path / "var", dicom_port=free_port(), network_timeout_s=5, **overrides)
    store = Store(settings.db_path, durable=settings.fsync)
    spool = Spool(settings.spool_dir, fsync=settings.fsync, min_free_bytes=min_free_bytes)
    scp = StorageSCP(settings, store, spool)
    scp.start()
    return Gateway(settings, store, spool, scp)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = _start(tmp_path)
    yield gw
    gw.scp.stop()


def _pynetdicom_assoc(port: int, calling_ae: str = "PYSCU") -> Association:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="DXGATE")
    assert assoc.is_established
    return assoc


def _wait_closed(gw: Gateway, n: int) -> list[dict]:
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rows = gw.associations()
        if len(rows) >= n and all(r["closed_at"] for r in rows):
            return rows
        time.sleep(0.02)
    raise AssertionError(f"associations not closed: {gw.associations()}")


def test_echo_and_association_bookkeeping(gateway: Gateway) -> None:
    res = run_echoscu(gateway.port, "DXGATE", calling_ae="MODALITY")
    assert res.returncode == 0, res.stderr
    (row,) = _wait_closed(gateway, 1)
    assert row["calling_ae"] == "MODALITY" and row["peer"] == "127.0.0.1" and row["aborted"] == 0


def test_storescu_files_are_stored_as_received(gateway: Gateway, tmp_path: Path) -> None:
    """Uncompressed, RLE and JPEG-LS instances: the spooled data set is byte-identical to the sent one."""
    series = write_ct_series(tmp_path / "in", 2, body_part="CHEST", slice_thickness=1.25)
    rle = write_ct(tmp_path / "in" / "rle.dcm", study_uid=pydicom.dcmread(series[0]).StudyInstanceUID,
                   instance_number=3, transfer_syntax=RLELossless, orientation="sagittal")
    jls = write_ct(tmp_path / "in" / "jls.dcm", instance_number=4, transfer_syntax=JPEGLSLossless)
    res = run_storescu([*series, rle], gateway.port, "DXGATE", calling_ae="PACS", extra=["-xr"])
    assert res.returncode == 0, res.stderr
    res = run_storescu([jls], gateway.port, "DXGATE", calling_ae="PACS", extra=["-xt"])
    assert res.returncode == 0, res.stderr

    rows = gateway.instances()
    assert [r["transfer_syntax"] for r in rows] == [ExplicitVRLittleEndian] * 2 + [RLELossless, JPEGLSLossless]
    for src, row in zip([*series, rle, jls], rows, strict=True):
        sent = pydicom.dcmread(src, stop_before_pixels=True)
        assert row["sop_instance_uid"] == sent.SOPInstanceUID
        stored = Path(row["path"])
        assert stored == gateway.spool.path_for(sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID)
        assert dataset_bytes(stored) == dataset_bytes(src)  # no decode / re-encode
        assert row["size"] == stored.stat().st_size
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == row["transfer_syntax"]
        assert meta.SendingApplicationEntityTitle == "PACS"
    first = rows[0]
    assert (first["modality"], first["body_part"], first["orientation"], first["slice_thickness"],
            first["rows"], first["columns"], first["series_number"], first["calling_ae"]) == (
        "CT", "CHEST", "axial", 1.25, 16, 16, 2, "PACS")
    assert rows[2]["orientation"] == "sagittal"
    assoc_rows = _wait_closed(gateway, 2)
    assert {r["id"] for r in assoc_rows} == {r["association_id"] for r in rows}
    assert all(r["aborted"] == 0 for r in assoc_rows)


def test_duplicate_instance_is_idempotent(tmp_path: Path) -> None:
    gw = _start(tmp_path, fsync=False)
    try:
        (f,) = write_ct_series(tmp_path / "in", 1)
        for _ in range(2):
            res = run_storescu([f], gw.port, "DXGATE")
            assert res.returncode == 0, res.stderr
        assert len(gw.instances()) == 1
        assert len(list(gw.spool.root.rglob("*.dcm"))) == 1
    finally:
        gw.scp.stop()


def test_unknown_calling_ae_is_rejected(tmp_path: Path) -> None:
    gw = _start(tmp_path, allowed_calling_aes=["PACS"])
    try:
        (f,) = write_ct_series(tmp_path / "in", 1)
        res = run_storescu([f], gw.port, "DXGATE", calling_ae="BADAE")
        assert res.returncode != 0
        assert "Calling AE Title Not Recognized" in res.stderr + res.stdout
        assert gw.instances() == [] and gw.associations() == []
        wait_for_echo(gw.port, "DXGATE", calling_ae="PACS")
        assert run_storescu([f], gw.port, "DXGATE", calling_ae="PACS").returncode == 0
        assert len(gw.instances()) == 1
    finally:
        gw.scp.stop()


def test_bad_data_sets_fail_while_a_concurrent_association_succeeds(
        gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assoc = _pynetdicom_assoc(gateway.port)
    try:
        # Server side of the open association: Nagle disabled.
        (server_assoc,) = gateway.scp.ae.active_associations
        sock = server_assoc.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

        # A concurrent association (dcmtk) stores normally while this one is open.
        good = write_ct_series(tmp_path / "good", 2)
        assert run_storescu(good, gateway.port, "DXGATE", calling_ae="OTHER").returncode == 0

        no_study = make_ct()
        del no_study.StudyInstanceUID
        assert assoc.send_c_store(no_study).Status == 0xC211  # missing identifier

        truncated = write_ct(tmp_path / "bad" / "truncated.dcm")
        truncated.write_bytes(truncated.read_bytes()[:-100])  # pixel data cut short
        mismatch = write_ct(tmp_path / "bad" / "mismatch.dcm")
        uid = pydicom.dcmread(mismatch).SOPInstanceUID
        other = uid[:-1] + ("2" if uid[-1] == "1" else "1")
        # The file meta (first occurrence) names another instance; the command carries that one.
        mismatch.write_bytes(mismatch.read_bytes().replace(uid.encode(), other.encode(), 1))
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes raw
        assert assoc.send_c_store(truncated).Status == 0xC210  # cannot understand
        assert assoc.send_c_store(mismatch).Status == 0xC210  # data set and command disagree
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)

        ok = make_ct()
        assert assoc.send_c_store(ok).Status == 0x0000  # the association survives bad instances
    finally:
        assoc.release()
    sops = {r["sop_instance_uid"] for r in gateway.instances()}
    assert sops == {pydicom.dcmread(p).SOPInstanceUID for p in good} | {ok.SOPInstanceUID}
    assert len(list(gateway.spool.root.rglob("*.dcm"))) == 3
    assert [p for p in gateway.spool.root.rglob("*") if p.is_file() and p.suffix != ".dcm"] == []


def test_out_of_resources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk below the watermark, and the disk filling mid-write (ENOSPC): 0xA700, nothing recorded."""
    gw = _start(tmp_path, min_free_bytes=1 << 62)
    try:
        assoc = _pynetdicom_assoc(gw.port)
        try:
            assert assoc.send_c_store(make_ct()).Status == 0xA700
            gw.spool.min_free_bytes = 0

            def disk_full(fd: int, buf: bytes | bytearray | memoryview) -> int:
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(spool_module, "_write_all", disk_full)
            assert assoc.send_c_store(make_ct()).Status == 0xA700
            monkeypatch.undo()
            assert assoc.send_c_store(make_ct()).Status == 0x0000
        finally:
            assoc.release()
        assert len(gw.instances()) == 1
        assert len([p for p in gw.spool.root.rglob("*") if p.is_file()]) == 1
    finally:
        gw.scp.stop()


def test_chunked_receive_mode_stores_the_same_bytes(gateway: Gateway, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With pynetdicom's STORE_RECV_CHUNKED_DATASET (data set received into a temp file) it works too."""
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    src = write_ct(tmp_path / "in" / "one.dcm")
    assoc = _pynetdicom_assoc(gateway.port)
    try:
        assert assoc.send_c_store(pydicom.dcmread(src)).Status == 0x0000
    finally:
        assoc.release()
    (row,) = gateway.instances()
    assert dataset_bytes(Path(row["path"])) == dataset_bytes(src)
