"""/health (open), /api/system/health, /api/system/stats, /api/workers."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get

from service.api.security import CAN_READ
from service.errors import NbcronError
from service.store import Store


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
        self, request: Request[Any, Any, Any], store: Store
    ) -> Response[dict[str, Any]]:
        """Postgres and worker checks; 503 naming the failing parts."""
        timeout = request.app.state.settings.heartbeat_timeout_seconds
        checks: dict[str, Any] = {}
        try:
            store.ping()
            workers = [w for w in store.list_workers(timeout=timeout) if w["alive"]]
            checks["postgres"] = {"status": "ok"}
            checks["workers"] = {"status": "ok" if workers else "down", "alive": len(workers)}
        except NbcronError as exc:
            checks["postgres"] = {"status": "down", "detail": exc.detail}
        failing = sorted(k for k, v in checks.items() if v["status"] != "ok")
        body = {"status": "ok" if not failing else "degraded", "failing": failing, "checks": checks}
        return Response(body, status_code=503 if failing else 200)

    @get("/workers", operation_id="listWorkers", sync_to_thread=True)
    def workers(self, request: Request[Any, Any, Any], store: Store) -> list[dict[str, Any]]:
        """Registered workers with their queues, heartbeat and load."""
        timeout = request.app.state.settings.heartbeat_timeout_seconds
        return store.list_workers(timeout=timeout)
