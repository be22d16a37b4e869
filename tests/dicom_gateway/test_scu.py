"""C-STORE SCU: `send_paths` of a folder into dcmtk storescp, per-file statuses, unreachable peers, context limits."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless

from dicom_gateway.errors import DeliveryError
from dicom_gateway.receive.scp import StorageSCP
from dicom_gateway.receive.spool import Spool
from dicom_gateway.send.scu import MAX_CONTEXTS, AssociationFailedError, _contexts_for, _File, send_paths
from dicom_gateway.send.scu import store_datasets_or_files as store_files
from dicom_gateway.settings import Destination, Settings
from dicom_gateway.store import Store
from harness.ct import write_ct, write_ct_series
from harness.dcmtk import storescp
from harness.system import free_port


@pytest.mark.integration
def test_send_folder_into_storescp(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    files = write_ct_series(folder / "series1", 3)
    files.append(write_ct(folder / "series2" / "rle.dcm", transfer_syntax=RLELossless))
    (folder / "README.txt").write_text("not DICOM")
    with storescp(tmp_path / "received") as peer:
        report = send_paths([folder], "127.0.0.1", peer.port, peer.ae_title, calling_ae="DXGATE_SCU",
                            timeout_s=10)
        received = peer.files()
    assert (report.sent, report.failed) == (4, 0), str(report)
    assert report.skipped == [folder / "README.txt"]
    assert all(status == 0x0000 for _, status in report.statuses)
    got = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in received}
    assert set(got) == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    rle_uid = str(pydicom.dcmread(files[-1], stop_before_pixels=True).SOPInstanceUID)
    assert pydicom.dcmread(got[rle_uid]).file_meta.TransferSyntaxUID == RLELossless  # sent as-is


def test_unreachable_peer_raises_quickly(tmp_path: Path) -> None:
    write_ct_series(tmp_path, 1)
    t0 = time.monotonic()
    with pytest.raises(AssociationFailedError):
        send_paths([tmp_path], "127.0.0.1", free_port(), "NOBODY", timeout_s=2)
    dest = Destination(name="down", ae_title="NOBODY", host="127.0.0.1", port=free_port())
    with pytest.raises(DeliveryError):
        store_files(list(tmp_path.glob("*.dcm")), dest, "DXGATE", timeout_s=2)
    assert time.monotonic() - t0 < 4


def test_unreadable_file_is_a_delivery_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    dest = Destination(name="x", ae_title="X", host="127.0.0.1", port=free_port())
    with pytest.raises(DeliveryError, match="not a readable DICOM"):
        store_files([junk], dest, "DXGATE", timeout_s=1)


@pytest.mark.integration
def test_per_file_status_from_a_refusing_peer(tmp_path: Path) -> None:
    """A peer answering 0xA700 (our own SCP with a full disk): statuses come back, nothing is raised."""
    settings = Settings(data_dir=tmp_path / "var", dicom_port=free_port(), network_timeout_s=5)
    store = Store(settings.db_path)
    scp = StorageSCP(settings, store, Spool(settings.spool_dir, min_free_bytes=1 << 62))
    scp.start()
    try:
        files = write_ct_series(tmp_path / "out", 2)
        dest = Destination(name="gw", ae_title="DXGATE", host="127.0.0.1", port=scp.port)
        assert store_files(files, dest, "SENDER", timeout_s=5) == [(f, 0xA700) for f in files]
    finally:
        scp.stop()


def test_contexts_are_split_at_128() -> None:
    files = [_File(Path(f"{i}.dcm"), f"{CTImageStorage}.{i}", ExplicitVRLittleEndian) for i in range(130)]
    files.append(_File(Path("rle.dcm"), CTImageStorage, RLELossless))
    groups = _contexts_for(files)
    assert [len(g) for g in groups] == [MAX_CONTEXTS, 3]
    rle = next(cx for g in groups for cx in g if cx.abstract_syntax == CTImageStorage)
    assert rle.transfer_syntax == [RLELossless]  # compressed: proposed as-is only
    assert len(groups[0][0].transfer_syntax) == 2  # uncompressed: with the other uncompressed syntax
