"""The job store behind one small interface: `Store(db_path)` with one attribute per table.

    store.associations  open, close, close_stale                                   studies.py
    store.instances     record, exists, content_sha256, recorded_files, of_study   studies.py
    store.studies       receiving, set_state, in_state, get                        studies.py
    store.jobs          create, claim, renew, transition, fail, record_stages,     jobs.py
                        finish_encoding, replay, rerun, recover_orphans, requeue_orphans, get, find,
                        events, earlier_outputs, output_paths
    store.deliveries    of_job, due, record, acknowledge                           deliveries.py
    store.conflicts     record, exists, of_study, all                              conflicts.py
    store.db            the SQLite file: tx, query, one, close                     db.py

The schema is versioned (`schema.py`: migrations applied at open); every state change goes through
`transitions.py`, checked against its table in `dicom_gateway.states`, in one transaction. Nothing lives
only in memory: after a crash the store plus the spool are the whole truth.
"""

from __future__ import annotations

from pathlib import Path

from dicom_gateway.store.conflicts import ConflictRecord, Conflicts
from dicom_gateway.store.db import Database
from dicom_gateway.store.deliveries import Deliveries
from dicom_gateway.store.jobs import Jobs, series_set_hash
from dicom_gateway.store.schema import SCHEMA_VERSION
from dicom_gateway.store.studies import Associations, InstanceRecord, Instances, Studies

__all__ = ["SCHEMA_VERSION", "Associations", "ConflictRecord", "InstanceRecord", "Store", "series_set_hash"]


class Store:
    """One job store (a SQLite file); several may be open on the same file, in threads or processes."""

    def __init__(self, db_path: Path, durable: bool = True) -> None:
        self.db = Database(db_path, durable=durable)
        self.associations = Associations(self.db)
        self.instances = Instances(self.db)
        self.studies = Studies(self.db)
        self.jobs = Jobs(self.db)
        self.deliveries = Deliveries(self.db)
        self.conflicts = Conflicts(self.db)

    def close(self) -> None:
        """Close the calling thread's connection."""
        self.db.close()
