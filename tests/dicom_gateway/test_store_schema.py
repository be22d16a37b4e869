"""The job store's versioned schema: migrations at open, a pre-versioning file opens unchanged, newer is refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dicom_gateway.errors import GatewayError, SchemaVersionError
from dicom_gateway.store import SCHEMA_VERSION, InstanceRecord, Store
from dicom_gateway.store.schema import MIGRATIONS, V1_TABLES

TABLES = {"associations", "studies", "instances", "jobs", "job_events", "deliveries", "instance_conflicts"}


def _version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")} - {"sqlite_sequence"}


def test_migrations_are_ordered_and_version_is_their_count() -> None:
    assert SCHEMA_VERSION == len(MIGRATIONS) >= 1
    assert MIGRATIONS[0] == V1_TABLES


def test_empty_file_is_upgraded_to_the_current_version(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    path.touch()  # an empty file: version 0, no tables
    assert _version(path) == 0
    store = Store(path, durable=False)
    assert _version(path) == SCHEMA_VERSION
    assert _tables(path) == TABLES
    job_id, created = store.jobs.create(study_uid="1.2", model="m", model_version="1", series_uid="1.2.1",
                                        input_uids=["1.2.1.1"], destinations=[], rule=None)
    assert created and store.jobs.get(job_id)["state"] == "QUEUED"
    store.close()
    Store(path, durable=False).close()  # opening again at the current version changes nothing
    assert _version(path) == SCHEMA_VERSION


def test_version_1_file_from_before_versioning_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as conn:  # as the store wrote it before it recorded a version
        for statement in V1_TABLES:
            conn.execute(statement)
        conn.execute("INSERT INTO studies(study_uid, state, epoch, first_received_at, last_received_at)"
                     " VALUES ('1.2.3', 'ROUTED', 2, 1.0, 2.0)")
    before = [line for line in _dump(path) if line.startswith("INSERT")]
    store = Store(path, durable=False)
    assert _version(path) == SCHEMA_VERSION
    with sqlite3.connect(path) as conn:  # version 1's rows kept, later migrations' columns added
        assert conn.execute("SELECT study_uid, state, epoch FROM studies").fetchall() == [("1.2.3", "ROUTED", 2)]
        columns = {r[1] for r in conn.execute("PRAGMA table_info(instances)")}
    assert len(before) == 1 and {"content_sha256", "images_in_acquisition", "slice_position"} <= columns
    assert dict(store.studies.get("1.2.3"))["epoch"] == 2
    assert store.instances.record(InstanceRecord(  # a late instance reopens the study with a new epoch
        sop_instance_uid="1.2.3.1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_uid="1.2.3",
        series_uid="1.2.3.1", transfer_syntax=None, path="/x", size=1, calling_ae="PACS", association_id=None))
    assert (store.studies.get("1.2.3")["state"], store.studies.get("1.2.3")["epoch"]) == ("RECEIVING", 3)
    store.close()


def _dump(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return list(conn.iterdump())


def test_newer_schema_is_refused_naming_both_versions(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    Store(path, durable=False).close()
    newer = SCHEMA_VERSION + 1
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {newer}")
    with pytest.raises(SchemaVersionError) as info:
        Store(path, durable=False)
    assert isinstance(info.value, GatewayError)
    message = str(info.value)
    assert f"schema version {newer}" in message and f"version {SCHEMA_VERSION}" in message
    assert _version(path) == newer  # the refused file is left as it was
