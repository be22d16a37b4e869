"""/jobs: list, one job's detail (inputs, outputs, history, timings, deliveries), replay."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Query

from dicom_gateway.api.schemas import ErrorBody, JobDetail, JobSummary, ReplayResult, job_detail, job_summary
from dicom_gateway.errors import NotFoundError
from dicom_gateway.states import JobState
from dicom_gateway.store import Store

log = logging.getLogger("dicom_gateway.api")

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody}}


def job_or_404(store: Store, job_id: int) -> Any:
    """The job's row; NotFoundError (404) when there is none."""
    row = store.jobs.get(job_id)
    if row is None:
        raise NotFoundError(f"job {job_id} not found")
    return row


def jobs_router(store: Store) -> APIRouter:
    """The job endpoints over one job store."""
    router = APIRouter(prefix="/jobs", tags=["jobs"])

    @router.get("", response_model=list[JobSummary])
    def list_jobs(state: JobState | None = Query(None, description="Only jobs in this state"),
                  study_uid: str | None = Query(None, description="Only jobs of this StudyInstanceUID"),
                  limit: int = Query(100, ge=1, le=10000)) -> list[JobSummary]:
        """Jobs, newest first."""
        return [job_summary(r) for r in store.jobs.find(state=state, study_uid=study_uid or None, limit=limit)]

    @router.get("/{job_id}", response_model=JobDetail, responses=NOT_FOUND)
    def get_job(job_id: int) -> JobDetail:
        """One job with its inputs, outputs, history, per-stage timings and deliveries."""
        return job_detail(store, job_or_404(store, job_id))

    @router.post("/{job_id}/replay", response_model=ReplayResult, responses={**NOT_FOUND, 409: {"model": ErrorBody}})
    def replay(job_id: int) -> ReplayResult:
        """Replay a FAILED or DONE job: resend if outputs exist, else run it again (409 for any other state)."""
        job_or_404(store, job_id)
        state = store.jobs.replay(job_id)  # JobStateError (409) unless FAILED or DONE
        log.info("job replayed", extra={"job_id": job_id, "state": str(state)})
        return ReplayResult(id=job_id, state=state)

    return router
