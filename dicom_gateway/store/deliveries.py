"""Deliveries: one row per (job, destination), PENDING until SENT or DEAD (DELIVERY_TRANSITIONS).

The outcome of each C-STORE attempt is recorded here, and the job settles with its deliveries: DONE
once every one is SENT, FAILED at stage send once none is PENDING and one is DEAD (a dead letter).
Each SOP Instance UID the destination acknowledged is kept in `sent_uids` as soon as its C-STORE
response arrives, so an attempt after a crash or an abort mid-send sends only what was not
acknowledged, with the same UIDs.
"""

from __future__ import annotations

import json
import sqlite3
import time

from dicom_gateway.states import DeliveryState, JobState, Stage
from dicom_gateway.store.db import Database
from dicom_gateway.store.transitions import move_delivery, move_job


class Deliveries:
    """The deliveries table; `record` is the sender's one write."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def of_job(self, job_id: int) -> list[sqlite3.Row]:
        """A job's deliveries by destination name."""
        return self.db.query("SELECT * FROM deliveries WHERE job_id=? ORDER BY destination", (job_id,))

    def acknowledge(self, job_id: int, destination: str, sop_instance_uid: str) -> None:
        """Record that the destination acknowledged (C-STORE success) one SOP instance of this delivery."""
        with self.db.tx() as db:
            row = db.execute("SELECT sent_uids FROM deliveries WHERE job_id=? AND destination=?",
                             (job_id, destination)).fetchone()
            if row is None:
                return
            uids = json.loads(row["sent_uids"] or "[]")
            if sop_instance_uid not in uids:
                uids.append(sop_instance_uid)
                db.execute("UPDATE deliveries SET sent_uids=? WHERE job_id=? AND destination=?",
                           (json.dumps(uids), job_id, destination))

    def due(self, now: float | None = None) -> list[sqlite3.Row]:
        """PENDING deliveries whose next attempt is due, of jobs still ENCODED or SENDING, oldest first."""
        now = time.time() if now is None else now
        return self.db.query(
            "SELECT d.* FROM deliveries d JOIN jobs j ON j.id = d.job_id WHERE d.state=? AND"
            " d.next_attempt_at <= ? AND j.state IN (?, ?) ORDER BY d.next_attempt_at",
            (DeliveryState.PENDING, now, JobState.ENCODED, JobState.SENDING))

    def record(self, job_id: int, destination: str, *, ok: bool, error: str | None = None,
               retry_at: float | None = None) -> None:
        """One C-STORE attempt's outcome; settles the job (DONE / FAILED at stage send) when all settled.

        ok -> SENT; not ok with retry_at -> stays PENDING until then; not ok without -> DEAD (dead letter).
        """
        now = time.time()
        with self.db.tx() as db:
            job = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if job["state"] == JobState.ENCODED:
                move_job(db, job_id, JobState.SENDING)
            if ok:
                move_delivery(db, job_id, destination, DeliveryState.SENT, attempted=True, sent_at=now,
                              last_error=None)
            else:
                state = DeliveryState.PENDING if retry_at is not None else DeliveryState.DEAD
                move_delivery(db, job_id, destination, state, attempted=True, last_error=error,
                              next_attempt_at=retry_at or now)
            rows = db.execute("SELECT destination, state FROM deliveries WHERE job_id=? ORDER BY destination",
                              (job_id,)).fetchall()
            states = [r["state"] for r in rows]
            if DeliveryState.PENDING in states:
                return
            if all(s == DeliveryState.SENT for s in states):
                _settle_done(db, job_id, now)
            else:
                dead = [r["destination"] for r in rows if r["state"] == DeliveryState.DEAD]
                move_job(db, job_id, JobState.FAILED, stage=Stage.SEND,
                         detail=f"undeliverable to {', '.join(dead)}: {error}")


def _settle_done(db: sqlite3.Connection, job_id: int, now: float) -> None:
    """SENDING -> DONE, recording the send stage's time (since the job was ENCODED) in stage_seconds."""
    move_job(db, job_id, JobState.DONE)
    encoded = db.execute("SELECT MAX(at) AS t FROM job_events WHERE job_id=? AND to_state=?",
                         (job_id, JobState.ENCODED)).fetchone()["t"]
    if encoded is not None:
        row = db.execute("SELECT stage_seconds FROM jobs WHERE id=?", (job_id,)).fetchone()
        stages = {**json.loads(row["stage_seconds"]), Stage.SEND.value: round(now - encoded, 4)}
        db.execute("UPDATE jobs SET stage_seconds=? WHERE id=?", (json.dumps(stages), job_id))
