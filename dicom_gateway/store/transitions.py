"""Every state change the store makes goes through one of these, checked against its table in `states`.

Each takes the open transaction's connection, so the check and the write are one transaction with
whatever else the caller changes. A change the table does not list raises the store's state error.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from dicom_gateway.errors import DeliveryStateError, JobStateError, StudyStateError
from dicom_gateway.states import (
    DeliveryState,
    JobState,
    Stage,
    StudyState,
    can_delivery_transition,
    can_study_transition,
    can_transition,
)


def move_job(db: sqlite3.Connection, job_id: int, dst: JobState, *, stage: Stage | None = None,
             detail: str | None = None, expect: JobState | None = None, actor: str | None = None) -> JobState:
    """Move a job and append the event; FAILED records `stage` and `detail` as failed_stage and reason.

    `actor` names who asked for the change (an API token's name, "cli"); None for the gateway itself."""
    row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
    if row is None:
        raise JobStateError(f"job {job_id} does not exist")
    src = JobState(row["state"])
    if expect is not None and src != expect:
        raise JobStateError(f"job {job_id} is {src}, expected {expect}")
    if not can_transition(src, dst):
        raise JobStateError(f"job {job_id}: {src} -> {dst} is not allowed")
    now = time.time()
    failed_stage = stage if dst == JobState.FAILED else None
    reason = detail if dst == JobState.FAILED else None
    db.execute("UPDATE jobs SET state=?, updated_at=?, failed_stage=?, reason=? WHERE id=?",
               (dst, now, failed_stage, reason, job_id))
    if dst == JobState.QUEUED and src in (JobState.FAILED, JobState.DONE):  # a replay or re-run: a fresh count
        db.execute("UPDATE jobs SET crashes=0 WHERE id=?", (job_id,))
    db.execute("INSERT INTO job_events(job_id, from_state, to_state, at, stage, detail, actor)"
               " VALUES (?,?,?,?,?,?,?)", (job_id, src, dst, now, stage, detail, actor))
    return src


def move_study(db: sqlite3.Connection, study_uid: str, src: StudyState, dst: StudyState,
               **columns: Any) -> None:
    """Move a study the caller read in state `src` (in this transaction) and set `columns` with it."""
    if not can_study_transition(src, dst):
        raise StudyStateError(f"study {study_uid}: {src} -> {dst} is not allowed")
    sets = ", ".join(["state=?", *(f"{name}=?" for name in columns)])
    db.execute(f"UPDATE studies SET {sets} WHERE study_uid=?", (dst, *columns.values(), study_uid))


def move_delivery(db: sqlite3.Connection, job_id: int, destination: str, dst: DeliveryState, *,
                  attempted: bool = False, **columns: Any) -> DeliveryState:
    """Move one delivery and set `columns` with it (`attempted` counts one more attempt); returns its old state."""
    row = db.execute("SELECT state FROM deliveries WHERE job_id=? AND destination=?",
                     (job_id, destination)).fetchone()
    if row is None:
        raise DeliveryStateError(f"job {job_id} has no delivery to {destination!r}")
    src = DeliveryState(row["state"])
    if not can_delivery_transition(src, dst):
        raise DeliveryStateError(f"job {job_id} delivery to {destination!r}: {src} -> {dst} is not allowed")
    if src == DeliveryState.SENT and dst == DeliveryState.PENDING:  # a deliberate resend of everything
        columns.setdefault("sent_uids", "[]")
    sets = ", ".join(["state=?", *(f"{name}=?" for name in columns), *(["attempts=attempts+1"] if attempted else [])])
    db.execute(f"UPDATE deliveries SET {sets} WHERE job_id=? AND destination=?",
               (dst, *columns.values(), job_id, destination))
    return src
