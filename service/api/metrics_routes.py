"""GET /metrics and /api/system/metrics: Prometheus text for the whole cluster (service/metrics.py)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get

from service.api.common import StoreDep
from service.api.security import CAN_READ_METRICS
from service.metrics import CONTENT_TYPE, ApiMetrics
from service.store import Store


def _exposition(request: Request[Any, Any, Any], store: Store) -> Response[bytes]:
    metrics: ApiMetrics = request.app.state.metrics
    return Response(metrics.render(store), media_type=CONTENT_TYPE)


@get(
    "/metrics",
    operation_id="metrics",
    guards=CAN_READ_METRICS,
    sync_to_thread=True,
    tags=["system"],
    media_type=CONTENT_TYPE,
)
def metrics(request: Request[Any, Any, Any], store: StoreDep) -> Response[bytes]:
    """Prometheus text format: run counters and histograms, queues, workers, API requests."""
    return _exposition(request, store)


@get(
    "/api/system/metrics",
    operation_id="systemMetrics",
    guards=CAN_READ_METRICS,
    sync_to_thread=True,
    tags=["system"],
    media_type=CONTENT_TYPE,
)
def system_metrics(request: Request[Any, Any, Any], store: StoreDep) -> Response[bytes]:
    """The same as /metrics, under /api/system."""
    return _exposition(request, store)


ROUTES = [metrics, system_metrics]
