"""The HTTP API (FastAPI), assembled from one router per resource: health, jobs, studies, conflicts.

Every router but health carries the bearer-token authorizer (`auth`), the OpenAPI document and its
/docs and /redoc pages included; a Host outside `http_allowed_hosts` gets 400; no CORS headers are
ever sent. Read-mostly over the job store. Gateway errors become HTTP statuses in one place:
`http_status`, applied by the app's one GatewayError handler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from dicom_gateway.api.auth import HostCheck, TokenBook, authorizer
from dicom_gateway.api.conflicts import conflicts_router
from dicom_gateway.api.health import health_router
from dicom_gateway.api.jobs import jobs_router
from dicom_gateway.api.metrics import metrics_router
from dicom_gateway.api.studies import studies_router
from dicom_gateway.errors import GatewayError, NotFoundError, StateError
from dicom_gateway.settings import Settings
from dicom_gateway.settings_security import ApiToken
from dicom_gateway.store import Store

UNSPECIFIED_ADDRESSES = ("0.0.0.0", "::")

log = logging.getLogger("dicom_gateway.api")


def http_status(exc: GatewayError) -> int:
    """The one place a gateway error becomes an HTTP status."""
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, StateError):
        return 409
    return 500


def allowed_hosts(settings: Settings) -> list[str]:
    """The Host header values the API answers: `http_allowed_hosts` plus `http_bind_address` (unless 0.0.0.0/::)."""
    hosts = list(settings.http_allowed_hosts)
    if settings.http_bind_address not in UNSPECIFIED_ADDRESSES:
        hosts.append(settings.http_bind_address)
    return hosts


def docs_router(app: FastAPI) -> APIRouter:
    """/openapi.json, /docs and /redoc, served behind the authorizer like every other resource."""
    router = APIRouter(include_in_schema=False)

    @router.get("/openapi.json")
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs")
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} API")

    @router.get("/redoc")
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} API")

    return router


def create_app(settings: Settings, store: Store, readiness: Callable[[], dict[str, bool]],
               tokens: Sequence[ApiToken] | None = None) -> FastAPI:
    """Build the API over one job store. readiness() returns named checks (e.g. scp, models, store); `tokens` are
    the bearer tokens accepted (default `settings.api_tokens`; `serve` adds the generated local one)."""
    app = FastAPI(
        title="dxgate",
        description=f"DICOM AI inference gateway (AE title {settings.ae_title}). Research use only; not for"
                    " clinical use. Every endpoint but /healthz and /readyz needs `Authorization: Bearer <token>`.",
        version="0.1.0",
        docs_url=None, redoc_url=None, openapi_url=None,  # served by docs_router, behind the token
    )
    app.add_middleware(HostCheck, allowed=allowed_hosts(settings))
    protected = [Depends(authorizer(TokenBook(settings.api_tokens if tokens is None else tokens)))]

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        status = http_status(exc)
        if status >= 500:
            log.error("request failed", exc_info=exc, extra={"path": request.url.path})
        return JSONResponse(status_code=status, content={"detail": str(exc)})

    app.include_router(health_router(readiness))
    app.include_router(jobs_router(store), dependencies=protected)
    app.include_router(studies_router(store), dependencies=protected)
    app.include_router(conflicts_router(store), dependencies=protected)
    app.include_router(metrics_router(store), dependencies=protected)
    app.include_router(docs_router(app), dependencies=protected)
    return app
