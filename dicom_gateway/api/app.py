"""The HTTP API (FastAPI), assembled from one router per resource: health, jobs, studies.

OpenAPI at /openapi.json and /docs. Read-mostly over the job store. Gateway errors become HTTP
statuses in one place: `http_status`, applied by the app's one GatewayError handler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from dicom_gateway.api.health import health_router
from dicom_gateway.api.jobs import jobs_router
from dicom_gateway.api.studies import studies_router
from dicom_gateway.errors import GatewayError, NotFoundError, StateError
from dicom_gateway.settings import Settings
from dicom_gateway.store import Store

log = logging.getLogger("dicom_gateway.api")


def http_status(exc: GatewayError) -> int:
    """The one place a gateway error becomes an HTTP status."""
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, StateError):
        return 409
    return 500


def create_app(settings: Settings, store: Store, readiness: Callable[[], dict[str, bool]]) -> FastAPI:
    """Build the API over one job store. readiness() returns named checks (e.g. scp, models, store)."""
    app = FastAPI(
        title="dxgate",
        description=f"DICOM AI inference gateway (AE title {settings.ae_title}). Research use only; not for"
                    " clinical use.",
        version="0.1.0",
    )

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        status = http_status(exc)
        if status >= 500:
            log.error("request failed", exc_info=exc, extra={"path": request.url.path})
        return JSONResponse(status_code=status, content={"detail": str(exc)})

    app.include_router(health_router(readiness))
    app.include_router(jobs_router(store))
    app.include_router(studies_router(store))
    return app
