"""/conflicts: instances received again under a stored SOP Instance UID with different content.

Each is kept in the spool beside the stored one (never dropped) and listed here for an administrator
to resolve: UIDs, sizes, content hashes, the calling AE and the time; no patient data.
"""

from __future__ import annotations

import sqlite3

from fastapi import APIRouter, Query
from pydantic import BaseModel

from dicom_gateway.store import Store


class Conflict(BaseModel):
    """One kept conflicting instance (the stored instance of that SOP Instance UID is the one processed)."""

    id: int
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    size: int
    content_sha256: str
    stored_sha256: str | None
    calling_ae: str | None
    association_id: int | None
    received_at: float


def conflict(row: sqlite3.Row) -> Conflict:
    """The API's view of an instance_conflicts row (the spool path is not exposed)."""
    return Conflict(**{name: row[name] for name in Conflict.model_fields})


def conflicts_router(store: Store) -> APIRouter:
    """The conflict endpoints over one job store."""
    router = APIRouter(prefix="/conflicts", tags=["conflicts"])

    @router.get("", response_model=list[Conflict])
    def list_conflicts(study_uid: str | None = Query(default=None, description="only this study's conflicts"),
                       limit: int = Query(default=1000, ge=1, le=10000)) -> list[Conflict]:
        """Kept conflicting instances, oldest first (at most `limit`, the most recent)."""
        rows = store.conflicts.of_study(study_uid)[-limit:] if study_uid else store.conflicts.all(limit)
        return [conflict(r) for r in rows]

    return router
