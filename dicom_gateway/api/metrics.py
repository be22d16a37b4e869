"""/metrics: the gateway's Prometheus metrics (`dicom_gateway.metrics`) in the text exposition format.

Behind the bearer-token authorizer like every resource but /healthz and /readyz; a `read` token suffices
(Prometheus: `authorization: {credentials: <token>}` in the scrape config, docs/deployment.md "Metrics").
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from dicom_gateway.metrics import CONTENT_TYPE, exposition, registry_for
from dicom_gateway.store import Store


def metrics_router(store: Store) -> APIRouter:
    """GET /metrics over one job store."""
    router = APIRouter(tags=["metrics"])
    registry = registry_for(store)

    @router.get("/metrics", response_class=Response,
                responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}})
    def metrics() -> Response:
        """Studies, jobs, queue depth, deliveries, associations, stage latency histograms, C-STORE statuses."""
        return Response(content=exposition(registry), media_type=CONTENT_TYPE)

    return router
