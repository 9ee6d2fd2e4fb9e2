"""Metrics without servers: bucket maths, the Postgres collector's families, request middleware."""

from __future__ import annotations

import asyncio
import sys
import types
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.errors import UnavailableError
from service.metrics import (
    ApiMetrics,
    RequestMetrics,
    StoreCollector,
    cumulative_buckets,
    kernel_pool_ready,
)

BOUNDS = [0.5, 1.0, 10.0]


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def snapshot() -> dict[str, Any]:
    counters = [
        {
            "metric": "created",
            "executor": "shell",
            "label": "manual",
            "bucket": 0,
            "n": 3,
            "total": 0,
        },
        {
            "metric": "finished",
            "executor": "shell",
            "label": "failed",
            "bucket": 0,
            "n": 1,
            "total": 0,
        },
        {
            "metric": "duration",
            "executor": "shell",
            "label": "succeeded",
            "bucket": 0,
            "n": 2,
            "total": 0.4,
        },
        {
            "metric": "duration",
            "executor": "shell",
            "label": "succeeded",
            "bucket": 3,
            "n": 1,
            "total": 42.0,
        },
        {
            "metric": "dispatch_lag",
            "executor": "http",
            "label": "",
            "bucket": 1,
            "n": 4,
            "total": 3.2,
        },
        {
            "metric": "notification",
            "executor": "email",
            "label": "sent",
            "bucket": 0,
            "n": 5,
            "total": 0,
        },
    ]
    return {
        "bounds": BOUNDS,
        "counters": counters,
        "queues": [{"queue": "default", "queued": 7, "due": 5, "oldest_due_seconds": 12.5}],
        "running": [{"executor": "notebook", "n": 2}],
        "workers": {"alive": 2, "threads": 8, "busy": 3, "kernels": 4},
        "dispatchers": {"alive": 1, "last_heartbeat_age": 0.7},
        "notifications_pending": [{"channel": "webhook", "n": 1}],
    }


class FakeStore:
    def __init__(self, data: dict[str, Any] | None) -> None:
        self.data = data

    def metrics_snapshot(self, *, timeout: float) -> dict[str, Any]:
        if self.data is None:
            raise UnavailableError("the database is not reachable right now; try again")
        return self.data


def collected(data: dict[str, Any] | None) -> dict[Any, float]:
    registry = CollectorRegistry()
    collector = StoreCollector(heartbeat_timeout=30)
    collector.store = FakeStore(data)  # type: ignore[assignment]
    registry.register(collector)
    return samples(registry)


def test_buckets_are_cumulative_with_inf_last() -> None:
    assert cumulative_buckets([0.5, 1.0], {0: 2, 2: 1}) == [
        ("0.5", 2.0),
        ("1.0", 2.0),
        ("+Inf", 3.0),
    ]
    assert cumulative_buckets([], {}) == [("+Inf", 0.0)]


def test_collector_turns_the_snapshot_into_counters_histograms_and_gauges() -> None:
    got = collected(snapshot())
    assert got[("nbcron_database_up", ())] == 1
    assert got[("nbcron_runs_created_total", (("executor", "shell"), ("trigger", "manual")))] == 3
    assert got[("nbcron_runs_finished_total", (("executor", "shell"), ("status", "failed")))] == 1
    assert got[("nbcron_notifications_total", (("channel", "email"), ("status", "sent")))] == 5
    ok = (("executor", "shell"), ("status", "succeeded"))
    assert got[("nbcron_run_duration_seconds_bucket", (*ok[:1], ("le", "0.5"), ok[1]))] == 2
    assert got[("nbcron_run_duration_seconds_bucket", (*ok[:1], ("le", "10.0"), ok[1]))] == 2
    assert got[("nbcron_run_duration_seconds_bucket", (*ok[:1], ("le", "+Inf"), ok[1]))] == 3
    assert got[("nbcron_run_duration_seconds_count", ok)] == 3
    assert got[("nbcron_run_duration_seconds_sum", ok)] == pytest.approx(42.4)
    assert got[("nbcron_dispatch_lag_seconds_bucket", (("executor", "http"), ("le", "0.5")))] == 0
    assert got[("nbcron_dispatch_lag_seconds_bucket", (("executor", "http"), ("le", "1.0")))] == 4
    assert got[("nbcron_queue_depth", (("queue", "default"),))] == 5
    assert got[("nbcron_runs_queued", (("queue", "default"),))] == 7
    assert got[("nbcron_queue_oldest_due_seconds", (("queue", "default"),))] == 12.5
    assert got[("nbcron_runs_running", (("executor", "notebook"),))] == 2
    assert got[("nbcron_workers_alive", ())] == 2
    assert got[("nbcron_worker_threads", ())] == 8
    assert got[("nbcron_worker_threads_busy", ())] == 3
    assert got[("nbcron_kernel_pool_size", ())] == 4
    assert got[("nbcron_dispatchers_alive", ())] == 1
    assert got[("nbcron_notifications_pending", (("channel", "webhook"),))] == 1


def test_a_database_outage_is_one_gauge_not_an_error() -> None:
    assert collected(None) == {("nbcron_database_up", ()): 0.0}


def _call(app: Any, scope: dict[str, Any]) -> None:
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))


def test_request_middleware_counts_by_route_template_and_status() -> None:
    metrics = ApiMetrics(heartbeat_timeout=30)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    scope = {"type": "http", "method": "POST", "path_template": "/api/tasks/{ref}/trigger"}
    for _ in range(2):
        _call(RequestMetrics(app, metrics), scope)
    got = samples(metrics.registry)
    labels = (("method", "POST"), ("route", "/api/tasks/{ref}/trigger"), ("status", "202"))
    assert got[("nbcron_api_requests_total", labels)] == 2
    assert got[("nbcron_api_request_duration_seconds_count", labels)] == 2


def test_request_middleware_counts_errors_raised_by_inner_middleware() -> None:
    metrics = ApiMetrics(heartbeat_timeout=30)

    class Unauthorized(Exception):
        status_code = 401

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise Unauthorized()

    with pytest.raises(Unauthorized):
        _call(RequestMetrics(app, metrics), {"type": "http", "method": "GET", "path": "/x"})
    got = samples(metrics.registry)
    labels = (("method", "GET"), ("route", "unmatched"), ("status", "401"))
    assert got[("nbcron_api_requests_total", labels)] == 1


def test_kernel_pool_size_comes_from_the_worker_pool_when_there_is_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "executors.kernels", raising=False)
    assert kernel_pool_ready(["python3"]) is None

    class Pool:
        def ready_count(self, name: str) -> int:
            return {"python3": 2, "ir": 1}.get(name, 0)

    module = types.ModuleType("executors.kernels")
    module.active_pool = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "executors.kernels", module)
    assert kernel_pool_ready(["python3"]) is None
    module.active_pool = lambda: Pool()  # type: ignore[attr-defined]
    assert kernel_pool_ready(["python3", "ir"]) == 3
