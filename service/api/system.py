"""/health (open), /api/system/health, /api/system/stats, /api/workers."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get

from service import health as health_checks
from service.api.common import StoreDep
from service.api.security import CAN_READ


@get("/health", operation_id="health", sync_to_thread=False, tags=["system"])
def health() -> dict[str, str]:
    """Liveness, no auth."""
    return {"status": "ok"}


class SystemController(Controller):
    path = "/api"
    tags = ["system"]
    guards = CAN_READ

    @get("/system/health", operation_id="systemHealth", sync_to_thread=True)
    def system_health(
        self, request: Request[Any, Any, Any], store: StoreDep
    ) -> Response[dict[str, Any]]:
        """Postgres, broker, dispatcher heartbeat and live workers, each with its status and
        latency; 200 when all are up, 503 with `failing` naming the parts that are down."""
        body = health_checks.system_health(store, request.app.state.settings)
        return Response(body, status_code=503 if body["failing"] else 200)

    @get("/system/stats", operation_id="systemStats", sync_to_thread=True)
    def system_stats(self, request: Request[Any, Any, Any], store: StoreDep) -> dict[str, Any]:
        """Tasks, runs by status in the last hour and day, workers, queue depth."""
        return health_checks.system_stats(store, request.app.state.settings)

    @get("/workers", operation_id="listWorkers", sync_to_thread=True)
    def workers(self, request: Request[Any, Any, Any], store: StoreDep) -> list[dict[str, Any]]:
        """Registered workers with their queues, heartbeat and load."""
        timeout = request.app.state.settings.heartbeat_timeout_seconds
        return store.list_workers(timeout=timeout)
