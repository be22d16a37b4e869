"""The job store: SQLite (WAL) holding instances, studies, associations, jobs, events and deliveries.

Every state change is one transaction. Nothing lives only in memory: after a crash the store plus the
spool are the whole truth. One connection per thread; `busy_timeout` serialises writers.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_gateway.errors import JobStateError
from dicom_gateway.states import DeliveryState, JobState, StudyState, can_transition

SCHEMA = """
CREATE TABLE IF NOT EXISTS associations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    calling_ae TEXT NOT NULL, peer TEXT, opened_at REAL NOT NULL, closed_at REAL, aborted INTEGER DEFAULT 0
);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY, state TEXT NOT NULL, epoch INTEGER NOT NULL DEFAULT 1,
    calling_ae TEXT, first_received_at REAL NOT NULL, last_received_at REAL NOT NULL,
    ready_at REAL, routed_at REAL, reason TEXT
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY, sop_class_uid TEXT NOT NULL, study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL, transfer_syntax TEXT, path TEXT NOT NULL, size INTEGER NOT NULL,
    calling_ae TEXT, association_id INTEGER, received_at REAL NOT NULL, epoch INTEGER NOT NULL,
    modality TEXT, body_part TEXT, series_description TEXT, series_number INTEGER,
    slice_thickness REAL, orientation TEXT, instance_number INTEGER, rows INTEGER, columns INTEGER
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid, series_uid);
CREATE INDEX IF NOT EXISTS instances_assoc ON instances(association_id);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_key TEXT UNIQUE NOT NULL,
    study_uid TEXT NOT NULL, model TEXT NOT NULL, model_version TEXT NOT NULL, series_uid TEXT NOT NULL,
    series_set_hash TEXT NOT NULL, rule TEXT, destinations TEXT NOT NULL, state TEXT NOT NULL,
    failed_stage TEXT, reason TEXT, lease_owner TEXT, lease_expires_at REAL, attempts INTEGER DEFAULT 0,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, stage_seconds TEXT NOT NULL DEFAULT '{}',
    inputs TEXT NOT NULL DEFAULT '[]', outputs TEXT NOT NULL DEFAULT '[]', weights_sha256 TEXT,
    supersedes_job_id INTEGER, study_epoch INTEGER NOT NULL DEFAULT 1, findings INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs(study_uid);
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL, from_state TEXT, to_state TEXT NOT NULL,
    at REAL NOT NULL, stage TEXT, detail TEXT
);
CREATE INDEX IF NOT EXISTS job_events_job ON job_events(job_id);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id INTEGER NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER DEFAULT 0,
    next_attempt_at REAL NOT NULL, last_error TEXT, sent_at REAL, PRIMARY KEY (job_id, destination)
);
"""


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


def series_set_hash(sop_instance_uids: Sequence[str]) -> str:
    """Stable hash of the instances a job reads; part of the job key (DESIGN: identity is stable)."""
    h = hashlib.sha256()
    for uid in sorted(sop_instance_uids):
        h.update(uid.encode() + b"\0")
    return h.hexdigest()[:32]


class JobStore:
    def __init__(self, db_path: Path, durable: bool = True) -> None:
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._durable = durable
        self._local = threading.local()
        self._conn().executescript(SCHEMA)  # executescript manages its own transaction

    # -- connection handling ------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if self._durable else 'NORMAL'}")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT)."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, args).fetchall()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- associations -------------------------------------------------------------------------
    def open_association(self, calling_ae: str, peer: str | None) -> int:
        with self.tx() as db:
            cur = db.execute("INSERT INTO associations(calling_ae, peer, opened_at) VALUES (?,?,?)",
                             (calling_ae, peer, time.time()))
            return int(cur.lastrowid)

    def close_association(self, association_id: int, aborted: bool = False) -> None:
        with self.tx() as db:
            db.execute("UPDATE associations SET closed_at=?, aborted=? WHERE id=? AND closed_at IS NULL",
                       (time.time(), int(aborted), association_id))

    def close_stale_associations(self) -> int:
        """At start-up: associations left open by a crash can never be released; close them."""
        with self.tx() as db:
            cur = db.execute("UPDATE associations SET closed_at=?, aborted=1 WHERE closed_at IS NULL",
                             (time.time(),))
            return cur.rowcount

    # -- instances ----------------------------------------------------------------------------
    def record_instance(self, rec: InstanceRecord) -> bool:
        """Record a stored instance; False if this SOP Instance UID was already recorded (idempotent).

        A new instance of a study that was already READY/ROUTED reopens it with a new epoch, so the
        study is assembled and routed again and its new jobs supersede the earlier ones.
        """
        now = time.time()
        with self.tx() as db:
            if db.execute("SELECT 1 FROM instances WHERE sop_instance_uid=?", (rec.sop_instance_uid,)).fetchone():
                return False
            study = db.execute("SELECT state, epoch FROM studies WHERE study_uid=?", (rec.study_uid,)).fetchone()
            if study is None:
                epoch = 1
                db.execute("INSERT INTO studies(study_uid, state, epoch, calling_ae, first_received_at,"
                           " last_received_at) VALUES (?,?,?,?,?,?)",
                           (rec.study_uid, StudyState.RECEIVING, epoch, rec.calling_ae, now, now))
            else:
                epoch = study["epoch"]
                if study["state"] != StudyState.RECEIVING:
                    epoch += 1
                db.execute("UPDATE studies SET state=?, epoch=?, last_received_at=?, reason=NULL"
                           " WHERE study_uid=?", (StudyState.RECEIVING, epoch, now, rec.study_uid))
            db.execute(
                "INSERT INTO instances(sop_instance_uid, sop_class_uid, study_uid, series_uid, transfer_syntax,"
                " path, size, calling_ae, association_id, received_at, epoch, modality, body_part,"
                " series_description, series_number, slice_thickness, orientation, instance_number, rows,"
                " columns) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (rec.sop_instance_uid, rec.sop_class_uid, rec.study_uid, rec.series_uid, rec.transfer_syntax,
                 rec.path, rec.size, rec.calling_ae, rec.association_id, now, epoch, rec.modality,
                 rec.body_part, rec.series_description, rec.series_number, rec.slice_thickness,
                 rec.orientation, rec.instance_number, rec.rows, rec.columns))
            return True

    def has_instance(self, sop_instance_uid: str) -> bool:
        return bool(self.query("SELECT 1 FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)))

    def study_instances(self, study_uid: str) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM instances WHERE study_uid=? ORDER BY series_uid, instance_number",
                          (study_uid,))

    # -- studies ------------------------------------------------------------------------------
    def receiving_studies(self) -> list[sqlite3.Row]:
        """RECEIVING studies with the number of still-open associations that delivered to them."""
        return self.query(
            "SELECT s.*, (SELECT COUNT(DISTINCT a.id) FROM instances i JOIN associations a"
            " ON a.id = i.association_id WHERE i.study_uid = s.study_uid AND a.closed_at IS NULL)"
            " AS open_associations FROM studies s WHERE s.state = ?", (StudyState.RECEIVING,))

    def set_study_state(self, study_uid: str, state: StudyState, *, expect: StudyState | None = None,
                        epoch: int | None = None, reason: str | None = None) -> bool:
        """Move a study; with expect/epoch, only if it is still in that state and epoch (no lost update)."""
        now = time.time()
        sql = "UPDATE studies SET state=?, reason=?"
        args: list[Any] = [state, reason]
        if state == StudyState.READY:
            sql += ", ready_at=?"
            args.append(now)
        if state in (StudyState.ROUTED, StudyState.UNROUTED):
            sql += ", routed_at=?"
            args.append(now)
        sql += " WHERE study_uid=?"
        args.append(study_uid)
        if expect is not None:
            sql += " AND state=?"
            args.append(expect)
        if epoch is not None:
            sql += " AND epoch=?"
            args.append(epoch)
        with self.tx() as db:
            return db.execute(sql, args).rowcount == 1

    def studies_in_state(self, state: StudyState) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM studies WHERE state=? ORDER BY ready_at", (state,))

    def get_study(self, study_uid: str) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM studies WHERE study_uid=?", (study_uid,))
        return rows[0] if rows else None

    # -- jobs ---------------------------------------------------------------------------------
    def create_job(self, *, study_uid: str, model: str, model_version: str, series_uid: str,
                   input_uids: Sequence[str], destinations: Sequence[str], rule: str | None,
                   study_epoch: int = 1) -> tuple[int, bool]:
        """Create the job for (study, model, version, series set) unless it exists; (id, created)."""
        set_hash = series_set_hash(input_uids)
        key = f"{study_uid}|{model}|{model_version}|{set_hash}"
        now = time.time()
        with self.tx() as db:
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

    def _transition(self, db: sqlite3.Connection, job_id: int, dst: JobState, *, stage: str | None = None,
                    detail: str | None = None, expect: JobState | None = None) -> JobState:
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
        db.execute("INSERT INTO job_events(job_id, from_state, to_state, at, stage, detail) VALUES (?,?,?,?,?,?)",
                   (job_id, src, dst, now, stage, detail))
        return src

    def transition(self, job_id: int, dst: JobState, *, stage: str | None = None, detail: str | None = None,
                   expect: JobState | None = None) -> None:
        with self.tx() as db:
            self._transition(db, job_id, dst, stage=stage, detail=detail, expect=expect)

    def fail(self, job_id: int, stage: str, detail: str) -> None:
        """Any state -> FAILED with the stage that failed (a no-op if already FAILED)."""
        with self.tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row and row["state"] != JobState.FAILED:
                self._transition(db, job_id, JobState.FAILED, stage=stage, detail=detail)

    def claim_job(self, worker_id: str, lease_s: float) -> sqlite3.Row | None:
        """Claim the oldest QUEUED job (or a RUNNING one whose lease expired) and lease it to worker_id."""
        now = time.time()
        with self.tx() as db:
            row = db.execute(
                "SELECT id, state FROM jobs WHERE state=? OR (state=? AND lease_expires_at < ?)"
                " ORDER BY id LIMIT 1", (JobState.QUEUED, JobState.RUNNING, now)).fetchone()
            if row is None:
                return None
            if row["state"] == JobState.RUNNING:  # reclaim after a crash: record it in the history
                self._transition(db, row["id"], JobState.QUEUED, detail="lease expired; reclaimed")
            self._transition(db, row["id"], JobState.RUNNING, detail=f"worker {worker_id}")
            db.execute("UPDATE jobs SET lease_owner=?, lease_expires_at=?, attempts=attempts+1 WHERE id=?",
                       (worker_id, now + lease_s, row["id"]))
            return db.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone()

    def requeue_orphans(self) -> int:
        """At start-up with a single process: RUNNING jobs belong to a dead worker; requeue them now."""
        with self.tx() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE state=?", (JobState.RUNNING,))]
            for job_id in ids:
                self._transition(db, job_id, JobState.QUEUED, detail="worker died; requeued at start-up")
            return len(ids)

    def record_stages(self, job_id: int, seconds: dict[str, float]) -> None:
        with self.tx() as db:
            row = db.execute("SELECT stage_seconds FROM jobs WHERE id=?", (job_id,)).fetchone()
            merged = json.loads(row["stage_seconds"]) if row else {}
            merged.update({k: round(float(v), 4) for k, v in seconds.items()})
            db.execute("UPDATE jobs SET stage_seconds=? WHERE id=?", (json.dumps(merged), job_id))

    def finish_encoding(self, job_id: int, outputs: list[dict[str, Any]], weights_sha256: str,
                        findings: int, destinations: Sequence[str]) -> None:
        """RUNNING -> ENCODED with outputs recorded and one PENDING delivery per destination, atomically."""
        now = time.time()
        with self.tx() as db:
            self._transition(db, job_id, JobState.ENCODED, expect=JobState.RUNNING)
            db.execute("UPDATE jobs SET outputs=?, weights_sha256=?, findings=?, lease_owner=NULL,"
                       " lease_expires_at=NULL WHERE id=?", (json.dumps(outputs), weights_sha256, findings, job_id))
            for dest in destinations:
                db.execute("INSERT OR REPLACE INTO deliveries(job_id, destination, state, attempts,"
                           " next_attempt_at) VALUES (?,?,?,0,?)", (job_id, dest, DeliveryState.PENDING, now))
            if not destinations:  # nothing to send: the results stay in the outbox
                self._transition(db, job_id, JobState.SENDING, detail="no destinations configured")
                self._transition(db, job_id, JobState.DONE, detail="results kept in the outbox")

    def get_job(self, job_id: int) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM jobs WHERE id=?", (job_id,))
        return rows[0] if rows else None

    def list_jobs(self, state: JobState | None = None, study_uid: str | None = None,
                  limit: int = 100) -> list[sqlite3.Row]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if state is not None:
            sql += " AND state=?"
            args.append(state)
        if study_uid is not None:
            sql += " AND study_uid=?"
            args.append(study_uid)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return self.query(sql, args)

    def job_events(self, job_id: int) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM job_events WHERE job_id=? ORDER BY id", (job_id,))

    def earlier_outputs(self, job_id: int) -> list[dict[str, Any]]:
        """Outputs of the job this one supersedes (and so on back), newest first."""
        out: list[dict[str, Any]] = []
        row = self.get_job(job_id)
        seen = set()
        while row is not None and row["supersedes_job_id"] and row["supersedes_job_id"] not in seen:
            seen.add(row["supersedes_job_id"])
            row = self.get_job(row["supersedes_job_id"])
            if row is not None:
                out.extend(json.loads(row["outputs"]))
        return out

    # -- deliveries ---------------------------------------------------------------------------
    def deliveries(self, job_id: int) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM deliveries WHERE job_id=? ORDER BY destination", (job_id,))

    def due_deliveries(self, now: float | None = None) -> list[sqlite3.Row]:
        now = time.time() if now is None else now
        return self.query(
            "SELECT d.* FROM deliveries d JOIN jobs j ON j.id = d.job_id WHERE d.state=? AND"
            " d.next_attempt_at <= ? AND j.state IN (?, ?) ORDER BY d.next_attempt_at",
            (DeliveryState.PENDING, now, JobState.ENCODED, JobState.SENDING))

    def record_delivery(self, job_id: int, destination: str, *, ok: bool, error: str | None = None,
                        retry_at: float | None = None) -> None:
        """One C-STORE attempt's outcome; settles the job (DONE / FAILED at stage send) when all settled.

        ok -> SENT; not ok with retry_at -> stays PENDING until then; not ok without -> DEAD (dead letter).
        """
        now = time.time()
        with self.tx() as db:
            job = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if job["state"] == JobState.ENCODED:
                self._transition(db, job_id, JobState.SENDING)
            if ok:
                db.execute("UPDATE deliveries SET state=?, attempts=attempts+1, sent_at=?, last_error=NULL"
                           " WHERE job_id=? AND destination=?", (DeliveryState.SENT, now, job_id, destination))
            else:
                state = DeliveryState.PENDING if retry_at is not None else DeliveryState.DEAD
                db.execute("UPDATE deliveries SET state=?, attempts=attempts+1, last_error=?,"
                           " next_attempt_at=? WHERE job_id=? AND destination=?",
                           (state, error, retry_at or now, job_id, destination))
            states = [r["state"] for r in db.execute("SELECT state FROM deliveries WHERE job_id=?", (job_id,))]
            if DeliveryState.PENDING in states:
                return
            if all(s == DeliveryState.SENT for s in states):
                self._transition(db, job_id, JobState.DONE)
                encoded = db.execute("SELECT MAX(at) AS t FROM job_events WHERE job_id=? AND to_state=?",
                                     (job_id, JobState.ENCODED)).fetchone()["t"]
                if encoded is not None:
                    row = db.execute("SELECT stage_seconds FROM jobs WHERE id=?", (job_id,)).fetchone()
                    stages = {**json.loads(row["stage_seconds"]), "send": round(now - encoded, 4)}
                    db.execute("UPDATE jobs SET stage_seconds=? WHERE id=?", (json.dumps(stages), job_id))
            else:
                dead = [r["destination"] for r in db.execute(
                    "SELECT destination FROM deliveries WHERE job_id=? AND state=?", (job_id, DeliveryState.DEAD))]
                self._transition(db, job_id, JobState.FAILED, stage="send",
                                 detail=f"undeliverable to {', '.join(dead)}: {error}")

    def replay(self, job_id: int) -> JobState:
        """Replay a FAILED (or DONE) job: resend dead deliveries if outputs exist, else run it again."""
        now = time.time()
        with self.tx() as db:
            row = db.execute("SELECT state, failed_stage, outputs FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise JobStateError(f"job {job_id} does not exist")
            if row["state"] not in (JobState.FAILED, JobState.DONE):
                raise JobStateError(f"job {job_id} is {row['state']}; only FAILED or DONE jobs can be replayed")
            has_outputs = bool(json.loads(row["outputs"]))
            if has_outputs and (row["failed_stage"] == "send" or row["state"] == JobState.DONE):
                db.execute("UPDATE deliveries SET state=?, next_attempt_at=?, attempts=0 WHERE job_id=? AND"
                           " state != ?", (DeliveryState.PENDING, now, job_id, DeliveryState.SENT))
                if row["state"] == JobState.DONE:  # a deliberate resend of everything
                    db.execute("UPDATE deliveries SET state=?, next_attempt_at=? WHERE job_id=?",
                               (DeliveryState.PENDING, now, job_id))
                self._transition(db, job_id, JobState.SENDING, detail="replay: resend")
                return JobState.SENDING
            db.execute("UPDATE jobs SET outputs='[]', stage_seconds='{}' WHERE id=?", (job_id,))
            db.execute("DELETE FROM deliveries WHERE job_id=?", (job_id,))
            self._transition(db, job_id, JobState.QUEUED, detail="replay: rerun")
            return JobState.QUEUED
