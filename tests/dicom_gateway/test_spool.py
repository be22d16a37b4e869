"""Spool: atomic Part 10 writes, UID sanitising, disk watermark and ENOSPC (PS3.4 B.2.3 status 0xA700)."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pytest

from dicom_gateway.errors import SpoolFullError, UnparsableDatasetError, dimse_status
from dicom_gateway.receive import spool as spool_module
from dicom_gateway.receive.spool import Spool

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"
PAYLOAD = b"\x00" * 128 + b"DICM" + b"meta and data set bytes" * 100


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.suffix != ".dcm"]


@pytest.mark.parametrize("fsync", [True, False])
def test_store_writes_bytes_atomically(tmp_path: Path, fsync: bool) -> None:
    spool = Spool(tmp_path / "spool", fsync=fsync)
    path = spool.store(STUDY, SERIES, SOP, PAYLOAD)
    assert path == spool.path_for(STUDY, SERIES, SOP) == tmp_path / "spool" / STUDY / SERIES / f"{SOP}.dcm"
    assert path.read_bytes() == PAYLOAD
    assert _leftovers(tmp_path) == []


def test_store_accepts_file_like_and_chunks(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    assert spool.store(STUDY, SERIES, "1.1", io.BytesIO(PAYLOAD)).read_bytes() == PAYLOAD
    chunks = (PAYLOAD[:132], memoryview(PAYLOAD)[132:])
    assert spool.store(STUDY, SERIES, "1.2", chunks).read_bytes() == PAYLOAD


def test_store_replaces_existing_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.store(STUDY, SERIES, SOP, b"old")
    assert spool.store(STUDY, SERIES, SOP, b"new").read_bytes() == b"new"


@pytest.mark.parametrize("uid", ["..", "1..2", ".1", "1.", "1.2/3", "1.2.abc", "", "1" * 65, "1.2\\3"])
def test_malformed_uids_are_refused(tmp_path: Path, uid: str) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(UnparsableDatasetError) as err:
        spool.store(uid, SERIES, SOP, PAYLOAD)
    assert dimse_status(err.value) == 0xC210
    with pytest.raises(UnparsableDatasetError):
        spool.path_for(STUDY, SERIES, uid)
    assert list(tmp_path.iterdir()) == []


def test_low_disk_refuses_before_writing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=1 << 62)
    with pytest.raises(SpoolFullError) as err:
        spool.store(STUDY, SERIES, SOP, PAYLOAD)
    assert dimse_status(err.value) == 0xA700
    assert list((tmp_path / "spool").rglob("*")) == []


def test_enospc_during_write_removes_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills mid-write (simulated at the write call): no partial file stays, status 0xA700."""
    real_write_all = spool_module._write_all

    def write_then_fill(fd: int, buf: bytes | bytearray | memoryview) -> int:
        real_write_all(fd, memoryview(buf)[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module, "_write_all", write_then_fill)
    spool = Spool(tmp_path)
    with pytest.raises(OSError) as err:
        spool.store(STUDY, SERIES, SOP, PAYLOAD)
    assert err.value.errno == errno.ENOSPC
    assert dimse_status(err.value) == 0xA700
    assert not spool.path_for(STUDY, SERIES, SOP).exists()
    assert _leftovers(tmp_path) == []


def test_cleanup_temp_removes_partial_files_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    kept = spool.store(STUDY, SERIES, SOP, PAYLOAD)
    partial = kept.with_name(f".tmp-{SOP}.0123abcd.part")  # what a crash between write and rename leaves
    partial.write_bytes(PAYLOAD[:50])
    assert spool.cleanup_temp() == 1
    assert not partial.exists() and kept.read_bytes() == PAYLOAD
