"""Associations, instances and studies: what the SCP records and what assembly and routing read.

A new instance of a study that was already READY / ROUTED / UNROUTED reopens it (RECEIVING) with a
new epoch, so the study is assembled and routed again and its new jobs supersede the earlier ones.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from dicom_gateway.states import StudyState
from dicom_gateway.store.db import Database
from dicom_gateway.store.transitions import move_study


@dataclass(frozen=True)
class InstanceRecord:
    """What the SCP records per stored instance (header fields read without decoding pixels)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str | None
    path: str
    size: int
    calling_ae: str | None
    association_id: int | None
    modality: str | None = None
    body_part: str | None = None
    series_description: str | None = None
    series_number: int | None = None
    slice_thickness: float | None = None
    orientation: str | None = None  # axial | sagittal | coronal | oblique
    instance_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    content_sha256: str | None = None  # of the data set bytes as received (file meta excluded)
    images_in_acquisition: int | None = None  # (0020,1002), where the sender gives it
    slice_position: float | None = None  # ImagePositionPatient along the slice normal, mm


class Associations:
    """DICOM associations that delivered instances; a study is complete only once all are closed."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def open(self, calling_ae: str, peer: str | None, *, called_ae: str | None = None, tls: bool = False) -> int:
        """Record an accepted association (the AE titles, the peer's address, over TLS or not); returns its id."""
        with self.db.tx() as db:
            cur = db.execute("INSERT INTO associations(calling_ae, peer, opened_at, called_ae, tls) VALUES (?,?,?,?,?)",
                             (calling_ae, peer, time.time(), called_ae, int(tls)))
            return int(cur.lastrowid)

    def close(self, association_id: int, aborted: bool = False) -> None:
        """Record a release (or abort); a second close of the same association is a no-op."""
        with self.db.tx() as db:
            db.execute("UPDATE associations SET closed_at=?, aborted=? WHERE id=? AND closed_at IS NULL",
                       (time.time(), int(aborted), association_id))

    def close_stale(self) -> int:
        """At start-up: associations left open by a crash can never be released; close them."""
        with self.db.tx() as db:
            cur = db.execute("UPDATE associations SET closed_at=?, aborted=1 WHERE closed_at IS NULL",
                             (time.time(),))
            return cur.rowcount


_INSTANCE_COLUMNS = ("sop_instance_uid", "sop_class_uid", "study_uid", "series_uid", "transfer_syntax", "path",
                     "size", "calling_ae", "association_id", "modality", "body_part", "series_description",
                     "series_number", "slice_thickness", "orientation", "instance_number", "rows", "columns",
                     "content_sha256", "images_in_acquisition", "slice_position")


class Instances:
    """Stored SOP instances (the spool path and the header fields routing reads)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, rec: InstanceRecord) -> bool:
        """Record a stored instance; False if this SOP Instance UID was already recorded (idempotent).

        The study is created RECEIVING, or moved back to RECEIVING (a new epoch if it had left it).
        """
        now = time.time()
        with self.db.tx() as db:
            if db.execute("SELECT 1 FROM instances WHERE sop_instance_uid=?", (rec.sop_instance_uid,)).fetchone():
                return False
            study = db.execute("SELECT state, epoch FROM studies WHERE study_uid=?", (rec.study_uid,)).fetchone()
            if study is None:
                epoch = 1
                db.execute("INSERT INTO studies(study_uid, state, epoch, calling_ae, first_received_at,"
                           " last_received_at) VALUES (?,?,?,?,?,?)",
                           (rec.study_uid, StudyState.RECEIVING, epoch, rec.calling_ae, now, now))
            else:
                src = StudyState(study["state"])
                epoch = study["epoch"] + (src != StudyState.RECEIVING)
                move_study(db, rec.study_uid, src, StudyState.RECEIVING, epoch=epoch, last_received_at=now,
                           reason=None)
            names = (*_INSTANCE_COLUMNS, "received_at", "epoch")
            values = (*(getattr(rec, n) for n in _INSTANCE_COLUMNS), now, epoch)
            db.execute(f"INSERT INTO instances({', '.join(names)}) VALUES ({', '.join('?' * len(names))})", values)
            return True

    def exists(self, sop_instance_uid: str) -> bool:
        """Whether this SOP Instance UID is already stored."""
        return bool(self.db.query("SELECT 1 FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)))

    def content_sha256(self, sop_instance_uid: str) -> str | None:
        """The SHA-256 of the stored instance's data set bytes (None: not stored, or stored without one)."""
        row = self.db.one("SELECT content_sha256 FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,))
        return None if row is None else row["content_sha256"]

    def recorded_files(self) -> list[sqlite3.Row]:
        """(sop_instance_uid, path) of every spooled file the store knows: instances and kept conflicts."""
        return self.db.query("SELECT sop_instance_uid, path FROM instances"
                             " UNION SELECT sop_instance_uid, path FROM instance_conflicts")

    def of_study(self, study_uid: str) -> list[sqlite3.Row]:
        """A study's instances by series and instance number."""
        return self.db.query("SELECT * FROM instances WHERE study_uid=? ORDER BY series_uid, instance_number",
                             (study_uid,))


class Studies:
    """Studies and their state (STUDY_TRANSITIONS): RECEIVING -> READY -> ROUTED | UNROUTED."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def receiving(self) -> list[sqlite3.Row]:
        """RECEIVING studies, each with what completeness needs besides its own columns.

        `open_associations`: still-open associations that delivered to the study. `aborted_at`: when the
        last aborted association that delivered to it closed, unless a released association that also
        delivered to it opened after that (the sender's retry); NULL when no abort awaits a retry.
        """
        delivered = "SELECT i.association_id FROM instances i WHERE i.study_uid = s.study_uid"
        return self.db.query(
            "SELECT s.*, (SELECT COUNT(DISTINCT a.id) FROM instances i JOIN associations a"
            " ON a.id = i.association_id WHERE i.study_uid = s.study_uid AND a.closed_at IS NULL)"
            " AS open_associations,"
            f" (SELECT MAX(a.closed_at) FROM associations a WHERE a.aborted = 1 AND a.id IN ({delivered})"
            "  AND NOT EXISTS (SELECT 1 FROM associations r WHERE r.aborted = 0 AND r.closed_at IS NOT NULL"
            f"  AND r.opened_at >= a.closed_at AND r.id IN ({delivered}))) AS aborted_at"
            " FROM studies s WHERE s.state = ?", (StudyState.RECEIVING,))

    def set_state(self, study_uid: str, state: StudyState, *, expect: StudyState | None = None,
                  epoch: int | None = None, reason: str | None = None) -> bool:
        """Move a study; with expect/epoch, only if it is still in that state and epoch (no lost update).

        False when the study does not exist or has moved on; StudyStateError when the table forbids it.
        """
        now = time.time()
        columns: dict[str, Any] = {"reason": reason}
        if state == StudyState.READY:
            columns["ready_at"] = now
        if state in (StudyState.ROUTED, StudyState.UNROUTED):
            columns["routed_at"] = now
        with self.db.tx() as db:
            row = db.execute("SELECT state, epoch FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            if row is None or (expect is not None and row["state"] != expect) or (
                    epoch is not None and row["epoch"] != epoch):
                return False
            move_study(db, study_uid, StudyState(row["state"]), state, **columns)
            return True

    def in_state(self, state: StudyState) -> list[sqlite3.Row]:
        """Studies in one state, the earliest READY first."""
        return self.db.query("SELECT * FROM studies WHERE state=? ORDER BY ready_at", (state,))

    def get(self, study_uid: str) -> sqlite3.Row | None:
        """One study, or None."""
        return self.db.one("SELECT * FROM studies WHERE study_uid=?", (study_uid,))
