"""Jobs and their events: create (idempotent by job key), claim with a lease, record, encode, fail, replay.

A job's key is (StudyInstanceUID, model, model version, series set hash), so re-routing a study makes
no duplicate; a new series set makes a new job that supersedes the model's previous job of the study.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from dicom_gateway.errors import JobStateError
from dicom_gateway.states import DeliveryState, JobState, Stage
from dicom_gateway.store.db import Database
from dicom_gateway.store.transitions import move_delivery, move_job


def series_set_hash(sop_instance_uids: Sequence[str]) -> str:
    """Stable hash of the instances a job reads; part of the job key (identity is stable)."""
    h = hashlib.sha256()
    for uid in sorted(sop_instance_uids):
        h.update(uid.encode() + b"\0")
    return h.hexdigest()[:32]


class Jobs:
    """The jobs table (JOB_TRANSITIONS) and its event history."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, *, study_uid: str, model: str, model_version: str, series_uid: str,
               input_uids: Sequence[str], destinations: Sequence[str], rule: str | None,
               study_epoch: int = 1) -> tuple[int, bool]:
        """Create the job for (study, model, version, series set) unless it exists; (id, created)."""
        set_hash = series_set_hash(input_uids)
        key = f"{study_uid}|{model}|{model_version}|{set_hash}"
        now = time.time()
        with self.db.tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE job_key=?", (key,)).fetchone()
            if row:
                return int(row["id"]), False
            prev = db.execute("SELECT id FROM jobs WHERE study_uid=? AND model=? ORDER BY id DESC LIMIT 1",
                              (study_uid, model)).fetchone()
            cur = db.execute(
                "INSERT INTO jobs(job_key, study_uid, model, model_version, series_uid, series_set_hash, rule,"
                " destinations, state, created_at, updated_at, inputs, supersedes_job_id, study_epoch)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (key, study_uid, model, model_version, series_uid, set_hash, rule, json.dumps(list(destinations)),
                 JobState.QUEUED, now, now, json.dumps(sorted(input_uids)), prev["id"] if prev else None,
                 study_epoch))
            job_id = int(cur.lastrowid)
            db.execute("INSERT INTO job_events(job_id, from_state, to_state, at) VALUES (?,?,?,?)",
                       (job_id, None, JobState.QUEUED, now))
            return job_id, True

    def transition(self, job_id: int, dst: JobState, *, stage: Stage | None = None, detail: str | None = None,
                   expect: JobState | None = None) -> None:
        """Move a job (JobStateError when the table forbids it, or it is not in `expect`)."""
        with self.db.tx() as db:
            move_job(db, job_id, dst, stage=stage, detail=detail, expect=expect)

    def fail(self, job_id: int, stage: Stage, detail: str) -> None:
        """Any state -> FAILED with the stage that failed (a no-op if already FAILED)."""
        with self.db.tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row and row["state"] != JobState.FAILED:
                move_job(db, job_id, JobState.FAILED, stage=Stage(stage), detail=detail)

    def claim(self, worker_id: str, lease_s: float) -> sqlite3.Row | None:
        """Claim the oldest QUEUED job (or a RUNNING one whose lease expired) and lease it to worker_id."""
        now = time.time()
        with self.db.tx() as db:
            row = db.execute(
                "SELECT id, state FROM jobs WHERE state=? OR (state=? AND lease_expires_at < ?)"
                " ORDER BY id LIMIT 1", (JobState.QUEUED, JobState.RUNNING, now)).fetchone()
            if row is None:
                return None
            if row["state"] == JobState.RUNNING:  # reclaim after a crash: record it in the history
                move_job(db, row["id"], JobState.QUEUED, detail="lease expired; reclaimed")
            move_job(db, row["id"], JobState.RUNNING, detail=f"worker {worker_id}")
            db.execute("UPDATE jobs SET lease_owner=?, lease_expires_at=?, attempts=attempts+1 WHERE id=?",
                       (worker_id, now + lease_s, row["id"]))
            return db.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone()

    def requeue_orphans(self) -> int:
        """At start-up with a single process: RUNNING jobs belong to a dead worker; requeue them now."""
        with self.db.tx() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE state=?", (JobState.RUNNING,))]
            for job_id in ids:
                move_job(db, job_id, JobState.QUEUED, detail="worker died; requeued at start-up")
            return len(ids)

    def record_stages(self, job_id: int, seconds: dict[str, float]) -> None:
        """Merge per-stage wall times (seconds) into the job's stage_seconds."""
        with self.db.tx() as db:
            row = db.execute("SELECT stage_seconds FROM jobs WHERE id=?", (job_id,)).fetchone()
            merged = json.loads(row["stage_seconds"]) if row else {}
            merged.update({k: round(float(v), 4) for k, v in seconds.items()})
            db.execute("UPDATE jobs SET stage_seconds=? WHERE id=?", (json.dumps(merged), job_id))

    def finish_encoding(self, job_id: int, outputs: list[dict[str, Any]], weights_sha256: str,
                        findings: int, destinations: Sequence[str]) -> None:
        """RUNNING -> ENCODED with outputs recorded and one PENDING delivery per destination, atomically."""
        now = time.time()
        with self.db.tx() as db:
            move_job(db, job_id, JobState.ENCODED, expect=JobState.RUNNING)
            db.execute("UPDATE jobs SET outputs=?, weights_sha256=?, findings=?, lease_owner=NULL,"
                       " lease_expires_at=NULL WHERE id=?", (json.dumps(outputs), weights_sha256, findings, job_id))
            for dest in destinations:
                db.execute("INSERT OR REPLACE INTO deliveries(job_id, destination, state, attempts,"
                           " next_attempt_at) VALUES (?,?,?,0,?)", (job_id, dest, DeliveryState.PENDING, now))
            if not destinations:  # nothing to send: the results stay in the outbox
                move_job(db, job_id, JobState.SENDING, detail="no destinations configured")
                move_job(db, job_id, JobState.DONE, detail="results kept in the outbox")

    def get(self, job_id: int) -> sqlite3.Row | None:
        """One job, or None."""
        return self.db.one("SELECT * FROM jobs WHERE id=?", (job_id,))

    def find(self, state: JobState | None = None, study_uid: str | None = None,
             limit: int = 100) -> list[sqlite3.Row]:
        """Jobs, newest first, optionally of one state and/or one study."""
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if state is not None:
            sql += " AND state=?"
            args.append(state)
        if study_uid is not None:
            sql += " AND study_uid=?"
            args.append(study_uid)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return self.db.query(sql, args)

    def events(self, job_id: int) -> list[sqlite3.Row]:
        """A job's history: every transition, oldest first."""
        return self.db.query("SELECT * FROM job_events WHERE job_id=? ORDER BY id", (job_id,))

    def earlier_outputs(self, job_id: int) -> list[dict[str, Any]]:
        """Outputs of the job this one supersedes (and so on back), newest first."""
        out: list[dict[str, Any]] = []
        row = self.get(job_id)
        seen = set()
        while row is not None and row["supersedes_job_id"] and row["supersedes_job_id"] not in seen:
            seen.add(row["supersedes_job_id"])
            row = self.get(row["supersedes_job_id"])
            if row is not None:
                out.extend(json.loads(row["outputs"]))
        return out

    def replay(self, job_id: int) -> JobState:
        """Replay a FAILED (or DONE) job: resend dead deliveries if outputs exist, else run it again."""
        now = time.time()
        with self.db.tx() as db:
            row = db.execute("SELECT state, failed_stage, outputs FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise JobStateError(f"job {job_id} does not exist")
            if row["state"] not in (JobState.FAILED, JobState.DONE):
                raise JobStateError(f"job {job_id} is {row['state']}; only FAILED or DONE jobs can be replayed")
            has_outputs = bool(json.loads(row["outputs"]))
            if has_outputs and (row["failed_stage"] == Stage.SEND or row["state"] == JobState.DONE):
                # a FAILED job resends what was not SENT; a DONE job is a deliberate resend of everything
                for d in db.execute("SELECT destination, state FROM deliveries WHERE job_id=?", (job_id,)).fetchall():
                    if d["state"] != DeliveryState.SENT:
                        move_delivery(db, job_id, d["destination"], DeliveryState.PENDING, next_attempt_at=now,
                                      attempts=0)
                    elif row["state"] == JobState.DONE:
                        move_delivery(db, job_id, d["destination"], DeliveryState.PENDING, next_attempt_at=now)
                move_job(db, job_id, JobState.SENDING, detail="replay: resend")
                return JobState.SENDING
            db.execute("UPDATE jobs SET outputs='[]', stage_seconds='{}' WHERE id=?", (job_id,))
            db.execute("DELETE FROM deliveries WHERE job_id=?", (job_id,))
            move_job(db, job_id, JobState.QUEUED, detail="replay: rerun")
            return JobState.QUEUED
