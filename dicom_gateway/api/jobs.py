"""/jobs: list, one job's detail (inputs, outputs, history, timings, deliveries), replay, re-run.

Replay and re-run need an `operate` token; the token's name is recorded as the actor of the job's event."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Query, Request

from dicom_gateway.api.auth import actor_of, role_needed
from dicom_gateway.api.schemas import ErrorBody, JobDetail, JobSummary, ReplayResult, job_detail, job_summary
from dicom_gateway.errors import NotFoundError
from dicom_gateway.states import JobState
from dicom_gateway.store import Store

log = logging.getLogger("dicom_gateway.api")

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody}}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {**NOT_FOUND, 403: {"model": ErrorBody}, 409: {"model": ErrorBody}}


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

    @router.post("/{job_id}/replay", response_model=ReplayResult, responses=WRITE_ERRORS,
                 openapi_extra=role_needed("operate"))
    def replay(job_id: int, request: Request) -> ReplayResult:
        """Replay a FAILED or DONE job: resend if outputs exist, else run it again (409 for any other state)."""
        job_or_404(store, job_id)
        actor = actor_of(request)
        state = store.jobs.replay(job_id, actor=actor)  # JobStateError (409) unless FAILED or DONE
        log.info("job replayed", extra={"job_id": job_id, "state": str(state), "reason": f"by {actor}"})
        return ReplayResult(id=job_id, state=state)

    @router.post("/{job_id}/rerun", response_model=ReplayResult, responses=WRITE_ERRORS,
                 openapi_extra=role_needed("operate"))
    def rerun(job_id: int, request: Request) -> ReplayResult:
        """Run a FAILED or DONE job's inference again, even when it has outputs (409 for any other state)."""
        job_or_404(store, job_id)
        actor = actor_of(request)
        state = store.jobs.rerun(job_id, actor=actor)
        log.info("job re-run", extra={"job_id": job_id, "state": str(state), "reason": f"by {actor}"})
        return ReplayResult(id=job_id, state=state)

    return router
