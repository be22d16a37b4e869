"""The job store's schema as an ordered list of migrations, recorded in SQLite's `PRAGMA user_version`.

Migration N (1-based) moves a database from version N-1 to N; `migrate` applies the missing ones at
open, in one write transaction, so concurrent openers (receiver processes) never apply one twice. A
database written before versioning has user_version 0 and the version-1 tables; migration 1 uses
`IF NOT EXISTS` throughout, so such a file opens unchanged and is only stamped with version 1.
A database newer than this code is refused: running it could misread or corrupt what a newer dxgate wrote.
"""

from __future__ import annotations

import sqlite3

from dicom_gateway.errors import SchemaVersionError

V1_TABLES = (
    """CREATE TABLE IF NOT EXISTS associations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    calling_ae TEXT NOT NULL, peer TEXT, opened_at REAL NOT NULL, closed_at REAL, aborted INTEGER DEFAULT 0
)""",
    """CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY, state TEXT NOT NULL, epoch INTEGER NOT NULL DEFAULT 1,
    calling_ae TEXT, first_received_at REAL NOT NULL, last_received_at REAL NOT NULL,
    ready_at REAL, routed_at REAL, reason TEXT
)""",
    """CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY, sop_class_uid TEXT NOT NULL, study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL, transfer_syntax TEXT, path TEXT NOT NULL, size INTEGER NOT NULL,
    calling_ae TEXT, association_id INTEGER, received_at REAL NOT NULL, epoch INTEGER NOT NULL,
    modality TEXT, body_part TEXT, series_description TEXT, series_number INTEGER,
    slice_thickness REAL, orientation TEXT, instance_number INTEGER, rows INTEGER, columns INTEGER
)""",
    "CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid, series_uid)",
    "CREATE INDEX IF NOT EXISTS instances_assoc ON instances(association_id)",
    """CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_key TEXT UNIQUE NOT NULL,
    study_uid TEXT NOT NULL, model TEXT NOT NULL, model_version TEXT NOT NULL, series_uid TEXT NOT NULL,
    series_set_hash TEXT NOT NULL, rule TEXT, destinations TEXT NOT NULL, state TEXT NOT NULL,
    failed_stage TEXT, reason TEXT, lease_owner TEXT, lease_expires_at REAL, attempts INTEGER DEFAULT 0,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, stage_seconds TEXT NOT NULL DEFAULT '{}',
    inputs TEXT NOT NULL DEFAULT '[]', outputs TEXT NOT NULL DEFAULT '[]', weights_sha256 TEXT,
    supersedes_job_id INTEGER, study_epoch INTEGER NOT NULL DEFAULT 1, findings INTEGER
)""",
    "CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state)",
    "CREATE INDEX IF NOT EXISTS jobs_study ON jobs(study_uid)",
    """CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL, from_state TEXT, to_state TEXT NOT NULL,
    at REAL NOT NULL, stage TEXT, detail TEXT
)""",
    "CREATE INDEX IF NOT EXISTS job_events_job ON job_events(job_id)",
    """CREATE TABLE IF NOT EXISTS deliveries (
    job_id INTEGER NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER DEFAULT 0,
    next_attempt_at REAL NOT NULL, last_error TEXT, sent_at REAL, PRIMARY KEY (job_id, destination)
)""",
)

V2_SAFETY = (
    # a re-sent SOP instance is compared by content; a different one is kept as a conflict
    "ALTER TABLE instances ADD COLUMN content_sha256 TEXT",
    # completeness evidence from the headers: Images in Acquisition, position along the slice normal (mm)
    "ALTER TABLE instances ADD COLUMN images_in_acquisition INTEGER",
    "ALTER TABLE instances ADD COLUMN slice_position REAL",
    """CREATE TABLE IF NOT EXISTS instance_conflicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, sop_instance_uid TEXT NOT NULL, study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, content_sha256 TEXT NOT NULL,
    stored_sha256 TEXT, calling_ae TEXT, association_id INTEGER, received_at REAL NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS instance_conflicts_study ON instance_conflicts(study_uid)",
    "ALTER TABLE associations ADD COLUMN called_ae TEXT",
    "ALTER TABLE associations ADD COLUMN tls INTEGER NOT NULL DEFAULT 0",
    # consecutive times the process died while this job was RUNNING (crash-loop guard)
    "ALTER TABLE jobs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0",
    # who asked for a transition (an API token's name, or "cli") where a person did
    "ALTER TABLE job_events ADD COLUMN actor TEXT",
    # SOP Instance UIDs a destination acknowledged, so a resend after a crash skips them
    "ALTER TABLE deliveries ADD COLUMN sent_uids TEXT NOT NULL DEFAULT '[]'",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    V1_TABLES,  # 1: associations, studies, instances, jobs, job_events, deliveries
    V2_SAFETY,  # 2: content hashes and conflicts, completeness evidence, crash counts, actors, acked UIDs
)
"""Migration N is MIGRATIONS[N-1]: the SQL statements that take a database from version N-1 to N."""

SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    """The version a database is at (0: empty, or written before versioning)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _refuse_newer(found: int, path: object) -> None:
    if found > SCHEMA_VERSION:
        raise SchemaVersionError(f"job store {path} has schema version {found}, but this dxgate knows schema "
                                 f"version {SCHEMA_VERSION} at most; use the dxgate that wrote it (or a newer one)")


def migrate(conn: sqlite3.Connection, path: object = "") -> int:
    """Bring the database up to SCHEMA_VERSION; returns the version it was at. `path` names it in errors."""
    found = schema_version(conn)
    _refuse_newer(found, path)
    if found == SCHEMA_VERSION:
        return found
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = schema_version(conn)  # another process may have migrated meanwhile
        _refuse_newer(found, path)
        for version in range(found + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version:d}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return found
