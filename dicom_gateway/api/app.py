"""The HTTP API (FastAPI): health, readiness, jobs, studies, replay. OpenAPI at /openapi.json and /docs.

Read-mostly over the job store. Responses carry UIDs and technical facts, never patient names, IDs or
birth dates (the store holds none). Gateway errors become HTTP statuses in one place: `http_status`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from dicom_gateway.errors import ConfigError, GatewayError, JobStateError, NotFoundError
from dicom_gateway.route.series import SeriesSummary, summarise_series
from dicom_gateway.settings import Settings
from dicom_gateway.states import DeliveryState, JobState, StudyState
from dicom_gateway.store.jobstore import JobStore

log = logging.getLogger(__name__)


REPLAYABLE = frozenset({JobState.FAILED, JobState.DONE})




def http_status(exc: GatewayError) -> int:
    """The one place a gateway error becomes an HTTP status."""
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, JobStateError):
        return 409
    if isinstance(exc, ConfigError):
        return 500
    return 500


# -- response models ------------------------------------------------------------------------------
class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool]


class ErrorBody(BaseModel):
    detail: str


class JobSummary(BaseModel):
    id: int
    study_uid: str
    model: str
    model_version: str
    state: JobState
    failed_stage: str | None
    reason: str | None
    created_at: float
    updated_at: float
    findings: int | None


class JobEvent(BaseModel):
    from_state: JobState | None
    to_state: JobState
    at: float
    stage: str | None
    detail: str | None


class Delivery(BaseModel):
    destination: str
    state: DeliveryState
    attempts: int
    last_error: str | None
    next_attempt_at: float
    sent_at: float | None


class JobDetail(JobSummary):
    series_uid: str
    rule: str | None
    destinations: list[str]
    inputs: list[str] = Field(description="SOP Instance UIDs the model read")
    outputs: list[dict[str, Any]] = Field(description="What the job produced (SR, SEG, GSPS/SC), with UIDs")
    weights_sha256: str | None
    supersedes_job_id: int | None
    study_epoch: int
    attempts: int
    stage_seconds: dict[str, float]
    entered_at: dict[str, float] = Field(description="First time the job entered each state")
    events: list[JobEvent]
    deliveries: list[Delivery]


class SeriesInfo(BaseModel):
    series_uid: str
    series_number: int | None
    modality: str | None
    body_part: str | None
    series_description: str | None
    slice_thickness: float | None
    orientation: str | None
    n_instances: int
    calling_ae: str | None


class StudyDetail(BaseModel):
    study_uid: str
    state: StudyState
    epoch: int
    reason: str | None = Field(description="Why the study routed nowhere (or notes on rules that did not match)")
    calling_ae: str | None
    first_received_at: float
    last_received_at: float
    ready_at: float | None
    routed_at: float | None
    series: list[SeriesInfo]
    jobs: list[JobSummary]


class ReplayResult(BaseModel):
    id: int
    state: JobState


# -- row -> model ---------------------------------------------------------------------------------
def _summary(row: Any) -> JobSummary:
    return JobSummary(id=row["id"], study_uid=row["study_uid"], model=row["model"],
                      model_version=row["model_version"], state=row["state"], failed_stage=row["failed_stage"],
                      reason=row["reason"], created_at=row["created_at"], updated_at=row["updated_at"],
                      findings=row["findings"])


def _detail(store: JobStore, row: Any) -> JobDetail:
    events = [JobEvent(from_state=e["from_state"], to_state=e["to_state"], at=e["at"], stage=e["stage"],
                       detail=e["detail"]) for e in store.job_events(row["id"])]
    entered: dict[str, float] = {}
    for e in events:
        entered.setdefault(str(e.to_state), e.at)
    deliveries = [Delivery(destination=d["destination"], state=d["state"], attempts=d["attempts"] or 0,
                           last_error=d["last_error"], next_attempt_at=d["next_attempt_at"], sent_at=d["sent_at"])
                  for d in store.deliveries(row["id"])]
    return JobDetail(
        **_summary(row).model_dump(), series_uid=row["series_uid"], rule=row["rule"],
        destinations=json.loads(row["destinations"]), inputs=json.loads(row["inputs"]),
        outputs=json.loads(row["outputs"]), weights_sha256=row["weights_sha256"],
        supersedes_job_id=row["supersedes_job_id"], study_epoch=row["study_epoch"], attempts=row["attempts"] or 0,
        stage_seconds=json.loads(row["stage_seconds"]), entered_at=entered, events=events, deliveries=deliveries)


def _series_info(s: SeriesSummary) -> SeriesInfo:
    return SeriesInfo(series_uid=s.series_uid, series_number=s.series_number, modality=s.modality,
                      body_part=s.body_part, series_description=s.series_description,
                      slice_thickness=s.slice_thickness, orientation=s.orientation, n_instances=s.n_instances,
                      calling_ae=s.calling_ae)


def _job_or_404(store: JobStore, job_id: int) -> Any:
    row = store.get_job(job_id)
    if row is None:
        raise NotFoundError(f"job {job_id} not found")
    return row


# -- the app --------------------------------------------------------------------------------------
def create_app(settings: Settings, store: JobStore, readiness: Callable[[], dict[str, bool]]) -> FastAPI:
    """Build the API over one job store. readiness() returns named checks (e.g. scp, models, store)."""
    app = FastAPI(
        title="dxgate",
        description=f"DICOM AI inference gateway (AE title {settings.ae_title}). Research use only; not for"
                    " clinical use.",
        version="0.1.0",
    )
    not_found = {404: {"model": ErrorBody}}

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        status = http_status(exc)
        if status >= 500:
            log.error("request failed", exc_info=exc, extra={"path": request.url.path})
        return JSONResponse(status_code=status, content={"detail": str(exc)})

    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz() -> Health:
        """The process is alive."""
        return Health()

    @app.get("/readyz", response_model=Readiness, tags=["health"], responses={503: {"model": Readiness}})
    def readyz() -> JSONResponse:
        """Ready when every check is true (503 with the checks otherwise)."""
        try:
            checks = {name: bool(ok) for name, ok in readiness().items()}
        except Exception:  # a failing probe means not ready, never a crashed endpoint
            log.exception("readiness probe failed")
            checks = {"readiness_probe": False}
        ready = bool(checks) and all(checks.values())
        body = Readiness(ready=ready, checks=checks)
        return JSONResponse(status_code=200 if ready else 503, content=body.model_dump())

    @app.get("/jobs", response_model=list[JobSummary], tags=["jobs"])
    def list_jobs(state: JobState | None = Query(None, description="Only jobs in this state"),
                  study_uid: str | None = Query(None, description="Only jobs of this StudyInstanceUID"),
                  limit: int = Query(100, ge=1, le=10000)) -> list[JobSummary]:
        """Jobs, newest first."""
        return [_summary(r) for r in store.list_jobs(state=state, study_uid=study_uid or None, limit=limit)]

    @app.get("/jobs/{job_id}", response_model=JobDetail, tags=["jobs"], responses=not_found)
    def get_job(job_id: int) -> JobDetail:
        """One job with its inputs, outputs, history, per-stage timings and deliveries."""
        return _detail(store, _job_or_404(store, job_id))

    @app.post("/jobs/{job_id}/replay", response_model=ReplayResult, tags=["jobs"],
              responses={**not_found, 409: {"model": ErrorBody}})
    def replay(job_id: int) -> ReplayResult:
        """Replay a FAILED or DONE job: resend if outputs exist, else run it again."""
        row = _job_or_404(store, job_id)
        if row["state"] not in REPLAYABLE:
            raise JobStateError(f"job {job_id} is {row['state']}; only FAILED or DONE jobs can be replayed")
        state = store.replay(job_id)
        log.info("job replayed", extra={"job_id": job_id, "state": str(state)})
        return ReplayResult(id=job_id, state=state)

    @app.get("/studies/{study_uid}", response_model=StudyDetail, tags=["studies"], responses=not_found)
    def get_study(study_uid: str) -> StudyDetail:
        """A study's state, its series (technical attributes only) and its jobs."""
        row = store.get_study(study_uid)
        if row is None:
            raise NotFoundError(f"study {study_uid} not found")
        series = summarise_series(store.study_instances(study_uid))
        jobs = [_summary(r) for r in store.list_jobs(study_uid=study_uid, limit=10000)]
        return StudyDetail(
            study_uid=row["study_uid"], state=row["state"], epoch=row["epoch"], reason=row["reason"],
            calling_ae=row["calling_ae"], first_received_at=row["first_received_at"],
            last_received_at=row["last_received_at"], ready_at=row["ready_at"], routed_at=row["routed_at"],
            series=[_series_info(s) for s in series], jobs=jobs)

    return app
