"""Instance conflicts: a SOP Instance UID received again with different content.

The first instance stays the one routed and processed; each different later one is kept in the spool
(`Spool.store_conflict`) and recorded here, so nothing acknowledged is dropped and an administrator can
see and resolve it (`GET /conflicts`). Only UIDs, sizes, hashes, the calling AE and times are kept.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from dicom_gateway.store.db import Database


@dataclass(frozen=True)
class ConflictRecord:
    """One received instance whose SOP Instance UID was already stored with other content."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    path: str
    size: int
    content_sha256: str  # of the data set bytes as received now
    stored_sha256: str | None  # of the instance already stored (None: stored before hashes were kept)
    calling_ae: str | None
    association_id: int | None


class Conflicts:
    """The instance_conflicts table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, rec: ConflictRecord) -> bool:
        """Record a conflict; False when this very content was already recorded for this SOP instance."""
        with self.db.tx() as db:
            if db.execute("SELECT 1 FROM instance_conflicts WHERE sop_instance_uid=? AND content_sha256=?",
                          (rec.sop_instance_uid, rec.content_sha256)).fetchone():
                return False
            db.execute("INSERT INTO instance_conflicts(sop_instance_uid, study_uid, series_uid, path, size,"
                       " content_sha256, stored_sha256, calling_ae, association_id, received_at)"
                       " VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (rec.sop_instance_uid, rec.study_uid, rec.series_uid, rec.path, rec.size,
                        rec.content_sha256, rec.stored_sha256, rec.calling_ae, rec.association_id, time.time()))
            return True

    def exists(self, sop_instance_uid: str, content_sha256: str) -> bool:
        """Whether this content was already kept as a conflict of this SOP instance."""
        return bool(self.db.query("SELECT 1 FROM instance_conflicts WHERE sop_instance_uid=? AND content_sha256=?",
                                  (sop_instance_uid, content_sha256)))

    def of_study(self, study_uid: str) -> list[sqlite3.Row]:
        """A study's conflicts, oldest first."""
        return self.db.query("SELECT * FROM instance_conflicts WHERE study_uid=? ORDER BY id", (study_uid,))

    def all(self, limit: int = 1000) -> list[sqlite3.Row]:
        """The most recent conflicts, oldest first."""
        return self.db.query("SELECT * FROM (SELECT * FROM instance_conflicts ORDER BY id DESC LIMIT ?)"
                             " ORDER BY id", (limit,))
