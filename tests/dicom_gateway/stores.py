"""Helpers over a job store for the gateway's tests: instances written and recorded, associations awaited."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pydicom

from dicom_gateway.store import InstanceRecord, Store


def ingest(store: Store, spool: Path, datasets: list[pydicom.Dataset]) -> list[str]:
    """Write each data set under `spool` and record it as the SCP would; their SOP Instance UIDs."""
    uids = []
    for ds in datasets:
        path = spool / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        store.instances.record(InstanceRecord(
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, study_uid=ds.StudyInstanceUID,
            series_uid=ds.SeriesInstanceUID, transfer_syntax=ds.file_meta.TransferSyntaxUID, path=str(path),
            size=path.stat().st_size, calling_ae="PACS", association_id=None, modality=ds.Modality))
        uids.append(ds.SOPInstanceUID)
    return uids


def closed_associations(store: Store, calling_ae: str | None = None, timeout_s: float = 10.0) -> list[sqlite3.Row]:
    """The associations (of `calling_ae`, or all), once the first of them is recorded closed or the time is up."""
    sql, args = "SELECT closed_at, aborted FROM associations", ()
    if calling_ae is not None:
        sql, args = sql + " WHERE calling_ae=?", (calling_ae,)
    deadline = time.monotonic() + timeout_s
    while True:
        rows = store.db.query(sql + " ORDER BY id", args)
        if (rows and rows[0]["closed_at"]) or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)
