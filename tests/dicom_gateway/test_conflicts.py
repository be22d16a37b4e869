"""A SOP Instance UID received again: same bytes is a duplicate, other bytes is kept as a conflict (never dropped)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from dicom_gateway.api.conflicts import conflicts_router
from dicom_gateway.receive.scp import StorageSCP
from dicom_gateway.receive.spool import Spool
from dicom_gateway.settings import Settings
from dicom_gateway.store import Store
from harness.ct import dataset_bytes, make_ct
from harness.system import free_port

pytestmark = pytest.mark.integration

PHI = ("CANARY^PATIENT", "19010203", "PID-CANARY-77")


class Gateway:
    def __init__(self, tmp_path: Path) -> None:
        self.settings = Settings(data_dir=tmp_path / "var", dicom_port=free_port(), fsync=False,
                                 network_timeout_s=10)
        self.store = Store(self.settings.db_path, durable=False)
        self.spool = Spool(self.settings.spool_dir, fsync=False)
        self.scp = StorageSCP(self.settings, self.store, self.spool)
        self.scp.start()

    def send(self, *datasets: pydicom.Dataset) -> list[int]:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", self.scp.port, ae_title="DXGATE")
        assert assoc.is_established
        try:
            return [int(assoc.send_c_store(ds).Status) for ds in datasets]
        finally:
            assoc.release()

    def rows(self, table: str) -> list[dict]:
        return [dict(r) for r in self.store.db.query(f"SELECT * FROM {table} ORDER BY id")]  # noqa: S608


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(tmp_path)
    yield gw
    gw.scp.stop()


def _with_phi(ds: pydicom.Dataset) -> pydicom.Dataset:
    ds.PatientName, ds.PatientBirthDate, ds.PatientID = PHI
    return ds


def _encoded(ds: pydicom.Dataset) -> bytes:
    """The data set bytes pynetdicom sends for `ds` (Explicit VR Little Endian, no file meta)."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    meta = pydicom.dcmread(BytesIO(raw), stop_before_pixels=True).file_meta
    return raw[128 + 4 + 12 + int(meta.FileMetaInformationGroupLength):]


def test_same_bytes_again_is_a_duplicate(gateway: Gateway) -> None:
    ds = _with_phi(make_ct())
    assert gateway.send(ds, ds) == [0x0000, 0x0000]
    (row,) = gateway.store.instances.of_study(ds.StudyInstanceUID)
    assert row["content_sha256"] == hashlib.sha256(dataset_bytes(Path(row["path"]))).hexdigest()
    assert gateway.rows("instance_conflicts") == []
    assert not (gateway.spool.root / "conflicts").exists()


def test_other_bytes_under_a_stored_uid_are_kept_as_a_conflict(gateway: Gateway) -> None:
    first = _with_phi(make_ct(seed=1))
    second = _with_phi(make_ct(study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID,
                               sop_uid=first.SOPInstanceUID, seed=2))  # same UIDs, other pixels
    assert gateway.send(first, second, second) == [0x0000, 0x0000, 0x0000]

    (stored,) = gateway.store.instances.of_study(first.StudyInstanceUID)
    assert dataset_bytes(Path(stored["path"])) == _encoded(first)  # the first stays the one processed
    (conflict,) = gateway.rows("instance_conflicts")  # the third send is a duplicate of the conflict
    digest = hashlib.sha256(_encoded(second)).hexdigest()
    kept = Path(conflict["path"])
    conflicts_dir = gateway.spool.root / "conflicts" / first.StudyInstanceUID
    assert kept == conflicts_dir / f"{first.SOPInstanceUID}.{digest[:16]}.dcm"
    assert dataset_bytes(kept) == _encoded(second)
    assert pydicom.dcmread(kept).SOPInstanceUID == first.SOPInstanceUID
    assert (conflict["sop_instance_uid"], conflict["study_uid"], conflict["series_uid"], conflict["content_sha256"],
            conflict["stored_sha256"], conflict["calling_ae"], conflict["size"]) == (
        first.SOPInstanceUID, first.StudyInstanceUID, first.SeriesInstanceUID, digest, stored["content_sha256"],
        "PACS", kept.stat().st_size)
    assert conflict["association_id"] is not None
    assert gateway.store.conflicts.of_study(first.StudyInstanceUID)[0]["id"] == conflict["id"]

    app = FastAPI()
    app.include_router(conflicts_router(gateway.store))
    client = TestClient(app)
    body = client.get("/conflicts").json()
    assert client.get("/conflicts", params={"study_uid": first.StudyInstanceUID}).json() == body
    assert client.get("/conflicts", params={"study_uid": "1.2.3"}).json() == []
    (item,) = body
    assert (item["sop_instance_uid"], item["content_sha256"], item["stored_sha256"], item["size"]) == (
        first.SOPInstanceUID, digest, stored["content_sha256"], conflict["size"])
    assert "path" not in item
    text = json.dumps(body) + json.dumps(gateway.rows("instance_conflicts"))
    assert not [v for v in PHI if v in text]


def test_instance_recorded_without_a_hash_is_compared_by_its_spooled_bytes(gateway: Gateway) -> None:
    ds = make_ct()
    assert gateway.send(ds) == [0x0000]
    with gateway.store.db.tx() as db:  # as recorded before content hashes were kept
        db.execute("UPDATE instances SET content_sha256 = NULL")
    other = make_ct(study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID, sop_uid=ds.SOPInstanceUID,
                    seed=5)
    assert gateway.send(ds, other) == [0x0000, 0x0000]
    (conflict,) = gateway.rows("instance_conflicts")
    assert conflict["stored_sha256"] == hashlib.sha256(_encoded(ds)).hexdigest()
    assert conflict["content_sha256"] == hashlib.sha256(_encoded(other)).hexdigest()
