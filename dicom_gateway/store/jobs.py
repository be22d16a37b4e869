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

from dicom_gateway.errors import JobStateError, LeaseLostError
from dicom_gateway.states import DeliveryState, JobState, Stage
from dicom_gateway.store.db import Database
from dicom_gateway.store.transitions import move_delivery, move_job

CRASH_REASON = "the worker died while running this job {n} times"
"""The reason of a job FAILED by the crash-loop guard (settings.worker.max_crashes)."""


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

    def fail(self, job_id: int, stage: Stage, detail: str, worker_id: str | None = None) -> None:
        """Any state -> FAILED with the stage that failed (a no-op if already FAILED).

        With `worker_id` (a worker failing the job it runs): only while it holds the lease, else LeaseLostError."""
        with self.db.tx() as db:
            if worker_id is not None:
                _check_owner(db, job_id, worker_id)
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row and row["state"] != JobState.FAILED:
                move_job(db, job_id, JobState.FAILED, stage=Stage(stage), detail=detail)
                db.execute("UPDATE jobs SET crashes=0, lease_owner=NULL, lease_expires_at=NULL WHERE id=?",
                           (job_id,))

    def claim(self, worker_id: str, lease_s: float, max_crashes: int | None = None) -> sqlite3.Row | None:
        """Claim the oldest QUEUED job (or a RUNNING one whose lease expired) and lease it to worker_id.

        An expired lease means its worker died (or stalled): that counts as a crash of the job, and a job
        whose crashes reach `max_crashes` ends FAILED instead of being run again."""
        now = time.time()
        with self.db.tx() as db:
            while True:
                row = db.execute(
                    "SELECT id, state, crashes, stage_seconds FROM jobs WHERE state=? OR (state=? AND"
                    " lease_expires_at < ?) ORDER BY id LIMIT 1", (JobState.QUEUED, JobState.RUNNING, now)).fetchone()
                if row is None:
                    return None
                if row["state"] != JobState.RUNNING:
                    break
                if not _requeue_crashed(db, row, max_crashes, "lease expired; reclaimed"):
                    continue  # the crash-loop guard failed it: look for another job
                break
            move_job(db, row["id"], JobState.RUNNING, detail=f"worker {worker_id}")
            db.execute("UPDATE jobs SET lease_owner=?, lease_expires_at=?, attempts=attempts+1 WHERE id=?",
                       (worker_id, now + lease_s, row["id"]))
            return db.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone()

    def renew(self, job_id: int, worker_id: str, lease_s: float) -> bool:
        """Extend a RUNNING job's lease by lease_s from now; False when worker_id no longer holds it."""
        with self.db.tx() as db:
            cur = db.execute("UPDATE jobs SET lease_expires_at=? WHERE id=? AND state=? AND lease_owner=?",
                             (time.time() + lease_s, job_id, JobState.RUNNING, worker_id))
            return cur.rowcount == 1

    def recover_orphans(self, max_crashes: int | None = None) -> tuple[list[int], list[int]]:
        """At start-up with a single process: RUNNING jobs belong to a dead worker, a crash each.

        Returns (requeued, failed): a job whose crashes reach `max_crashes` ends FAILED (CRASH_REASON)."""
        requeued: list[int] = []
        failed: list[int] = []
        with self.db.tx() as db:
            rows = db.execute("SELECT id, state, crashes, stage_seconds FROM jobs WHERE state=?",
                              (JobState.RUNNING,)).fetchall()
            for row in rows:
                if _requeue_crashed(db, row, max_crashes, "worker died; requeued at start-up"):
                    requeued.append(int(row["id"]))
                else:
                    failed.append(int(row["id"]))
        return requeued, failed

    def requeue_orphans(self, max_crashes: int | None = None) -> int:
        """`recover_orphans`; returns how many jobs were requeued."""
        return len(self.recover_orphans(max_crashes)[0])

    def record_stages(self, job_id: int, seconds: dict[str, float], worker_id: str | None = None) -> None:
        """Merge per-stage wall times (seconds) into the job's stage_seconds (`worker_id`: only as lease holder)."""
        with self.db.tx() as db:
            if worker_id is not None:
                _check_owner(db, job_id, worker_id)
            row = db.execute("SELECT stage_seconds FROM jobs WHERE id=?", (job_id,)).fetchone()
            merged = json.loads(row["stage_seconds"]) if row else {}
            merged.update({k: round(float(v), 4) for k, v in seconds.items()})
            db.execute("UPDATE jobs SET stage_seconds=? WHERE id=?", (json.dumps(merged), job_id))

    def finish_encoding(self, job_id: int, outputs: list[dict[str, Any]], weights_sha256: str,
                        findings: int, destinations: Sequence[str], worker_id: str | None = None) -> None:
        """RUNNING -> ENCODED with outputs recorded and one PENDING delivery per destination, atomically.

        With `worker_id`: only while it holds the lease (LeaseLostError otherwise, nothing written)."""
        now = time.time()
        with self.db.tx() as db:
            if worker_id is not None:
                _check_owner(db, job_id, worker_id)
            move_job(db, job_id, JobState.ENCODED, expect=JobState.RUNNING)
            db.execute("UPDATE jobs SET outputs=?, weights_sha256=?, findings=?, lease_owner=NULL,"
                       " lease_expires_at=NULL, crashes=0 WHERE id=?",
                       (json.dumps(outputs), weights_sha256, findings, job_id))
            for dest in destinations:
                db.execute("INSERT OR REPLACE INTO deliveries(job_id, destination, state, attempts,"
                           " next_attempt_at) VALUES (?,?,?,0,?)", (job_id, dest, DeliveryState.PENDING, now))
            if not destinations:  # nothing to send: the results stay in the outbox
                move_job(db, job_id, JobState.SENDING, detail="no destinations configured")
                move_job(db, job_id, JobState.DONE, detail="results kept in the outbox")

    def output_paths(self) -> set[str]:
        """The path of every output any job records (the outbox files that must stay)."""
        rows = self.db.query("SELECT outputs FROM jobs WHERE outputs != '[]'")
        return {str(o["path"]) for r in rows for o in json.loads(r["outputs"]) if o.get("path")}

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

    def replay(self, job_id: int, actor: str | None = None) -> JobState:
        """Replay a FAILED (or DONE) job: resend dead deliveries if outputs exist, else run it again.

        `actor` (an API token's name, "cli") is recorded in the job's event."""
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
                move_job(db, job_id, JobState.SENDING, detail="replay: resend", actor=actor)
                return JobState.SENDING
            db.execute("UPDATE jobs SET outputs='[]', stage_seconds='{}' WHERE id=?", (job_id,))
            db.execute("DELETE FROM deliveries WHERE job_id=?", (job_id,))
            move_job(db, job_id, JobState.QUEUED, detail="replay: rerun", actor=actor)
            return JobState.QUEUED

    def rerun(self, job_id: int, actor: str | None = None) -> JobState:
        """Run a FAILED or DONE job's inference again even when it has outputs (they and its deliveries are dropped;
        the new run encodes and sends afresh). `actor` is recorded in the job's event."""
        with self.db.tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise JobStateError(f"job {job_id} does not exist")
            if row["state"] not in (JobState.FAILED, JobState.DONE):
                raise JobStateError(f"job {job_id} is {row['state']}; only FAILED or DONE jobs can be re-run")
            db.execute("UPDATE jobs SET outputs='[]', stage_seconds='{}' WHERE id=?", (job_id,))
            db.execute("DELETE FROM deliveries WHERE job_id=?", (job_id,))
            move_job(db, job_id, JobState.QUEUED, detail="rerun", actor=actor)
            return JobState.QUEUED


def _check_owner(db: sqlite3.Connection, job_id: int, worker_id: str) -> None:
    """LeaseLostError unless the job is RUNNING and leased to worker_id (in the caller's transaction)."""
    row = db.execute("SELECT state, lease_owner FROM jobs WHERE id=?", (job_id,)).fetchone()
    if row is None:
        raise JobStateError(f"job {job_id} does not exist")
    if row["state"] != JobState.RUNNING or row["lease_owner"] != worker_id:
        holder = f"leased to worker {row['lease_owner']}" if row["lease_owner"] else "no longer leased"
        raise LeaseLostError(f"job {job_id} is {row['state']}, {holder}; worker {worker_id} lost its lease")


def _requeue_crashed(db: sqlite3.Connection, row: sqlite3.Row, max_crashes: int | None, detail: str) -> bool:
    """A RUNNING job whose worker died: count the crash; requeue it (True) or, at max_crashes, fail it (False).

    The stage recorded is the one it was in as far as the recorded stage times tell: encode once the model's
    stages finished, else infer (loading, preprocessing and inference run as one step)."""
    job_id, crashes = int(row["id"]), int(row["crashes"]) + 1
    db.execute("UPDATE jobs SET crashes=?, lease_owner=NULL, lease_expires_at=NULL WHERE id=?", (crashes, job_id))
    if max_crashes is not None and crashes >= max_crashes:
        stage = Stage.ENCODE if "postprocess" in json.loads(row["stage_seconds"] or "{}") else Stage.INFER
        move_job(db, job_id, JobState.FAILED, stage=stage, detail=CRASH_REASON.format(n=crashes))
        return False
    move_job(db, job_id, JobState.QUEUED, detail=f"{detail} (crash {crashes})")
    return True
