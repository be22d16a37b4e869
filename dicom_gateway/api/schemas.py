"""The HTTP API's response models (pydantic) and the conversions from job store rows to them.

Responses carry UIDs and technical facts, never patient names, IDs or birth dates (the store holds none).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from dicom_gateway.route.series import SeriesSummary
from dicom_gateway.states import DeliveryState, JobState, Stage, StudyState
from dicom_gateway.store import Store


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
    failed_stage: Stage | None
    reason: str | None
    created_at: float
    updated_at: float
    findings: int | None


class JobEvent(BaseModel):
    from_state: JobState | None
    to_state: JobState
    at: float
    stage: Stage | None
    detail: str | None
    actor: str | None = Field(default=None, description="Who asked for it (an API token's name, cli); none: dxgate")


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
    completeness: str | None = Field(default=None, description="complete, consistent, incomplete or unknown, from "
                                     "Images in Acquisition and the slice grid")
    completeness_reason: str | None = None


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
def job_summary(row: Any) -> JobSummary:
    """A jobs row as the summary /jobs lists."""
    return JobSummary(id=row["id"], study_uid=row["study_uid"], model=row["model"],
                      model_version=row["model_version"], state=row["state"], failed_stage=row["failed_stage"],
                      reason=row["reason"], created_at=row["created_at"], updated_at=row["updated_at"],
                      findings=row["findings"])


def job_detail(store: Store, row: Any) -> JobDetail:
    """A jobs row with its events and deliveries, as /jobs/{id} returns it."""
    events = [JobEvent(from_state=e["from_state"], to_state=e["to_state"], at=e["at"], stage=e["stage"],
                       detail=e["detail"], actor=e["actor"]) for e in store.jobs.events(row["id"])]
    entered: dict[str, float] = {}
    for e in events:
        entered.setdefault(str(e.to_state), e.at)
    deliveries = [Delivery(destination=d["destination"], state=d["state"], attempts=d["attempts"] or 0,
                           last_error=d["last_error"], next_attempt_at=d["next_attempt_at"], sent_at=d["sent_at"])
                  for d in store.deliveries.of_job(row["id"])]
    return JobDetail(
        **job_summary(row).model_dump(), series_uid=row["series_uid"], rule=row["rule"],
        destinations=json.loads(row["destinations"]), inputs=json.loads(row["inputs"]),
        outputs=json.loads(row["outputs"]), weights_sha256=row["weights_sha256"],
        supersedes_job_id=row["supersedes_job_id"], study_epoch=row["study_epoch"], attempts=row["attempts"] or 0,
        stage_seconds=json.loads(row["stage_seconds"]), entered_at=entered, events=events, deliveries=deliveries)


def series_info(s: SeriesSummary) -> SeriesInfo:
    """One series' technical attributes."""
    return SeriesInfo(series_uid=s.series_uid, series_number=s.series_number, modality=s.modality,
                      body_part=s.body_part, series_description=s.series_description,
                      slice_thickness=s.slice_thickness, orientation=s.orientation, n_instances=s.n_instances,
                      calling_ae=s.calling_ae,
                      completeness=str(s.evidence.state) if s.evidence is not None else None,
                      completeness_reason=s.evidence.reason if s.evidence is not None else None)
