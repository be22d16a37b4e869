"""/healthz (the process is alive) and /readyz (every named readiness check is true)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from dicom_gateway.api.schemas import Health, Readiness

log = logging.getLogger("dicom_gateway.api")


def health_router(readiness: Callable[[], dict[str, bool]]) -> APIRouter:
    """The health endpoints; readiness() returns named checks (e.g. scp, models, store, disk)."""
    router = APIRouter(tags=["health"])

    @router.get("/healthz", response_model=Health)
    def healthz() -> Health:
        """The process is alive."""
        return Health()

    @router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
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

    return router
