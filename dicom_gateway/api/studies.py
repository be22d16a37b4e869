"""/studies/{uid}: a study's state, its series (technical attributes only) and its jobs."""

from __future__ import annotations

from fastapi import APIRouter

from dicom_gateway.api.schemas import ErrorBody, StudyDetail, job_summary, series_info
from dicom_gateway.errors import NotFoundError
from dicom_gateway.route.series import summarise_series
from dicom_gateway.store import Store


def studies_router(store: Store) -> APIRouter:
    """The study endpoints over one job store."""
    router = APIRouter(prefix="/studies", tags=["studies"])

    @router.get("/{study_uid}", response_model=StudyDetail, responses={404: {"model": ErrorBody}})
    def get_study(study_uid: str) -> StudyDetail:
        """A study's state, its series (technical attributes only) and its jobs."""
        row = store.studies.get(study_uid)
        if row is None:
            raise NotFoundError(f"study {study_uid} not found")
        series = summarise_series(store.instances.of_study(study_uid))
        jobs = [job_summary(r) for r in store.jobs.find(study_uid=study_uid, limit=10000)]
        return StudyDetail(
            study_uid=row["study_uid"], state=row["state"], epoch=row["epoch"], reason=row["reason"],
            calling_ae=row["calling_ae"], first_received_at=row["first_received_at"],
            last_received_at=row["last_received_at"], ready_at=row["ready_at"], routed_at=row["routed_at"],
            series=[series_info(s) for s in series], jobs=jobs)

    return router
