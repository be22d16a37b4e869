"""A SOP Instance UID received again: the same content is a duplicate, other content a kept conflict.

The stored instance stays the one routed and processed. A different one is written under
``<spool>/conflicts/<study>/<sop>.<hash16>.dcm`` (atomically, as the spool writes instances) and
recorded in instance_conflicts (`GET /conflicts`), and the sender gets 0x0000: what is acknowledged
is never dropped. Contents are compared by the SHA-256 of the data set bytes as received.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

from dicom_gateway.receive.spool import Payload, Spool
from dicom_gateway.store import ConflictRecord, Store

log = logging.getLogger("dxgate.scp")


def received_again(store: Store, spool: Spool, rec: ConflictRecord, payload: Payload, extra: dict[str, Any]) -> str:
    """Handle an instance whose SOP Instance UID is stored; returns the outcome the SCP logs.

    `rec` describes the new instance (its `path` and `stored_sha256` are filled in here); `payload` is
    its Part 10 bytes (file meta and data set) as the spool writes them.
    """
    sop = rec.sop_instance_uid
    stored = store.instances.content_sha256(sop) or spooled_sha256(store, sop)
    if stored == rec.content_sha256:
        return "duplicate (already stored)"
    if store.conflicts.exists(sop, rec.content_sha256):
        return "duplicate (already kept as a conflict)"
    path = spool.store_conflict(rec.study_uid, sop, rec.content_sha256, payload)
    try:
        store.conflicts.record(dataclasses.replace(rec, path=str(path), stored_sha256=stored))
    except BaseException:
        spool.remove(path)
        raise
    log.warning("SOP Instance UID received again with different content; kept as a conflict",
                extra={**extra, "reason": f"content sha256 {rec.content_sha256[:16]}, stored {(stored or '?')[:16]}"})
    return "kept as a conflict (SOP Instance UID already stored with other content)"


def spooled_sha256(store: Store, sop: str) -> str | None:
    """SHA-256 of a stored instance's data set read back from the spool (rows recorded without a hash)."""
    row = store.db.one("SELECT path FROM instances WHERE sop_instance_uid=?", (sop,))
    if row is None:
        return None
    try:
        return hashlib.sha256(dataset_part(Path(row["path"]))).hexdigest()
    except Exception:  # missing or unreadable: compared as unknown, so the new one is kept
        return None


def dataset_part(path: Path) -> bytes:
    """The data set bytes of a Part 10 file (after the preamble and the File Meta group, PS3.10 7.1)."""
    from pydicom.filereader import read_file_meta_info

    meta = read_file_meta_info(path)
    raw = path.read_bytes()
    return raw[132 + 12 + int(meta.FileMetaInformationGroupLength):]
