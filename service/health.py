"""The checks behind GET /api/system/health: Postgres, broker, dispatcher heartbeat, workers.

Each check reports `status` (`ok`, `down`, or `unknown` when Postgres cannot tell) and
`latency_ms`; the first two are probed live with short timeouts, the last two are read from the
heartbeats the dispatchers and workers write into Postgres.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from service.config import Settings
from service.errors import NbcronError
from service.store import Store

PROBE_TIMEOUT = 2.0


def _timed(probe: Callable[[], Any]) -> tuple[Any, float, str | None]:
    """Run `probe`; return its value, its latency in ms and an error text (or None)."""
    started = time.perf_counter()
    try:
        value, error = probe(), None
    except Exception as exc:  # a health check reports failures, it does not raise them
        value, error = None, _describe(exc)
    return value, round((time.perf_counter() - started) * 1000, 2), error


def _describe(exc: Exception) -> str:
    detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
    cause = exc.__cause__
    return (
        f"{detail} ({type(cause).__name__})" if isinstance(exc, NbcronError) and cause else detail
    )


def ping_broker(url: str | None, *, timeout: float = PROBE_TIMEOUT) -> None:
    """Open a connection to the broker and close it; raise when it does not answer."""
    if not url:
        raise ValueError("NBCRON_BROKER_URL is not set")
    if url.startswith(("amqp://", "amqps://")):
        _ping_amqp(url, timeout)
        return
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    finally:
        client.close()


def _ping_amqp(url: str, timeout: float) -> None:
    import pika

    params = pika.URLParameters(url)
    params.socket_timeout = timeout
    params.stack_timeout = timeout * 2
    params.connection_attempts = 1
    pika.BlockingConnection(params).close()


def _check(status_ok: bool, latency: float, **extra: Any) -> dict[str, Any]:
    return {"status": "ok" if status_ok else "down", "latency_ms": latency, **extra}


def _heartbeat_checks(probe: dict[str, Any] | None, latency: float) -> dict[str, Any]:
    if probe is None:
        unknown = {"status": "unknown", "latency_ms": latency, "detail": "Postgres is down"}
        return {"dispatcher": dict(unknown), "workers": dict(unknown)}
    workers, dispatchers = probe["workers"], probe["dispatchers"]
    age = dispatchers.get("last_heartbeat_age")
    return {
        "dispatcher": _check(
            bool(dispatchers.get("alive")),
            latency,
            alive=int(dispatchers.get("alive") or 0),
            last_heartbeat_seconds_ago=round(age, 1) if age is not None else None,
        ),
        "workers": _check(
            bool(workers.get("alive")), latency, alive=int(workers.get("alive") or 0)
        ),
    }


def system_health(store: Store, settings: Settings) -> dict[str, Any]:
    """All checks, with `failing` naming the parts that are down."""
    timeout = settings.heartbeat_timeout_seconds
    probe, pg_ms, pg_error = _timed(lambda: store.health_probe(timeout=timeout, wait=PROBE_TIMEOUT))
    _, broker_ms, broker_error = _timed(lambda: ping_broker(settings.broker_url))
    checks: dict[str, Any] = {
        "postgres": _check(pg_error is None, pg_ms, **({"detail": pg_error} if pg_error else {})),
        "broker": _check(
            broker_error is None, broker_ms, **({"detail": broker_error} if broker_error else {})
        ),
    }
    checks.update(_heartbeat_checks(probe, pg_ms))
    failing = sorted(name for name, check in checks.items() if check["status"] == "down")
    return {"status": "degraded" if failing else "ok", "failing": failing, "checks": checks}


def _runs_by_status(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    return {
        "last_hour": {r["status"]: int(r["last_hour"]) for r in rows if r["last_hour"]},
        "last_day": {r["status"]: int(r["last_day"]) for r in rows},
    }


def system_stats(store: Store, settings: Settings) -> dict[str, Any]:
    """Tasks, runs by status in the last hour and day (by queue time), workers, queue depth."""
    raw = store.system_stats(timeout=settings.heartbeat_timeout_seconds)
    queues = {r["queue"]: {"queued": int(r["queued"]), "due": int(r["due"])} for r in raw["queues"]}
    return {
        "tasks": {k: int(v) for k, v in raw["tasks"].items()},
        "runs": _runs_by_status(raw["runs"]),
        "workers": {k: int(v) for k, v in raw["workers"].items()},
        "queue_depth": sum(q["due"] for q in queues.values()),
        "queues": queues,
    }
