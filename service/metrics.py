"""Prometheus metrics for the whole cluster, served by any API process.

Why Postgres and not prometheus-client's multiprocess mode: workers and dispatchers run in other
processes, often on other machines, and come and go. Multiprocess mode only merges processes that
share one directory on one host, and loses a process's numbers when its files are cleaned. Every
run already passes through Postgres, so a trigger there (migrations/0002_observability.sql) keeps
run counters and histograms (created, finished, duration, dispatch lag) in a small sharded table,
and the rest (queue depth, running runs, live workers and their kernels, dispatchers, pending
notifications) are cheap reads of partial indexes. `StoreCollector` turns them into metrics at
scrape time, so the numbers are exact, survive restarts and include every process.

What is per API process (scrape each API if you run several): request counts and latency by
route and status (`RequestMetrics`) and the standard `process_*` metrics.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from service.errors import NbcronError
from service.store import Store

CONTENT_TYPE = CONTENT_TYPE_LATEST
API_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_COUNTERS = {
    "created": ("nbcron_runs_created", "Runs queued, by executor and trigger.", "trigger"),
    "finished": ("nbcron_runs_finished", "Runs that ended, by executor and status.", "status"),
    "notification": (
        "nbcron_notifications",
        "Notifications that ended, by channel and outcome (sent, skipped, failed).",
        "status",
    ),
}
_HISTOGRAMS = {
    "duration": ("nbcron_run_duration_seconds", "Run time from start to end.", "status"),
    "dispatch_lag": (
        "nbcron_dispatch_lag_seconds",
        "Start time minus scheduled time (the cron slot, or when the run became due).",
        None,
    ),
}


def cumulative_buckets(bounds: list[float], counts: dict[int, int]) -> list[tuple[str, float]]:
    """Prometheus `le` buckets from per-bucket counts (index len(bounds) is +Inf)."""
    out, running = [], 0
    for index in range(len(bounds) + 1):
        running += counts.get(index, 0)
        le = "+Inf" if index == len(bounds) else _le(bounds[index])
        out.append((le, float(running)))
    return out


def _le(bound: float) -> str:
    return str(int(bound)) + ".0" if bound == int(bound) else repr(bound)


def _label_name(metric: str) -> str:
    return "channel" if metric == "notification" else "executor"


def counter_families(rows: Iterable[dict[str, Any]]) -> list[Metric]:
    """The run and notification counters from `metrics_run_counters` rows."""
    families = {
        key: CounterMetricFamily(name, doc, labels=[_label_name(key), label])
        for key, (name, doc, label) in _COUNTERS.items()
    }
    for row in rows:
        family = families.get(row["metric"])
        if family is not None:
            family.add_metric([row["executor"], row["label"]], float(row["n"]))
    return list(families.values())


def histogram_families(rows: Iterable[dict[str, Any]], bounds: list[float]) -> list[Metric]:
    """Run duration and dispatch lag histograms from `metrics_run_counters` rows."""
    grouped: dict[tuple[str, str, str], dict[str, Any]] = defaultdict(
        lambda: {"counts": {}, "sum": 0.0}
    )
    for row in rows:
        if row["metric"] in _HISTOGRAMS:
            entry = grouped[(row["metric"], row["executor"], row["label"])]
            entry["counts"][int(row["bucket"])] = int(row["n"])
            entry["sum"] += float(row["total"])
    families = {}
    for key, (name, doc, label) in _HISTOGRAMS.items():
        labels = ["executor", label] if label else ["executor"]
        families[key] = HistogramMetricFamily(name, doc, labels=labels)
    for (metric, executor, label), entry in sorted(grouped.items()):
        values = [executor, label] if _HISTOGRAMS[metric][2] else [executor]
        families[metric].add_metric(
            values, cumulative_buckets(bounds, entry["counts"]), sum_value=entry["sum"]
        )
    return list(families.values())


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def labelled_gauge(
    name: str, doc: str, label: str, rows: Iterable[dict[str, Any]], key: str, value: str
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for row in rows:
        family.add_metric([str(row[key])], float(row[value] or 0))
    return family


def queue_families(queues: list[dict[str, Any]]) -> list[Metric]:
    return [
        labelled_gauge(
            "nbcron_queue_depth",
            "Runs due now and not started, by queue.",
            "queue",
            queues,
            "queue",
            "due",
        ),
        labelled_gauge(
            "nbcron_runs_queued",
            "Queued runs, including ones waiting for a later time.",
            "queue",
            queues,
            "queue",
            "queued",
        ),
        labelled_gauge(
            "nbcron_queue_oldest_due_seconds",
            "How long the oldest due run has waited.",
            "queue",
            queues,
            "queue",
            "oldest_due_seconds",
        ),
    ]


def liveness_families(snapshot: dict[str, Any]) -> list[Metric]:
    workers, dispatchers = snapshot["workers"], snapshot["dispatchers"]
    age = dispatchers.get("last_heartbeat_age")
    return [
        labelled_gauge(
            "nbcron_runs_running",
            "Runs executing now, by executor.",
            "executor",
            snapshot["running"],
            "executor",
            "n",
        ),
        gauge("nbcron_workers_alive", "Workers heartbeating.", float(workers.get("alive") or 0)),
        gauge(
            "nbcron_worker_threads", "Threads of live workers.", float(workers.get("threads") or 0)
        ),
        gauge(
            "nbcron_worker_threads_busy",
            "Runs live workers are executing.",
            float(workers.get("busy") or 0),
        ),
        gauge(
            "nbcron_kernel_pool_size",
            "Warm notebook kernels ready in live workers.",
            float(workers.get("kernels") or 0),
        ),
        gauge(
            "nbcron_dispatchers_alive",
            "Dispatchers heartbeating.",
            float(dispatchers.get("alive") or 0),
        ),
        gauge(
            "nbcron_dispatcher_heartbeat_age_seconds",
            "Seconds since the last dispatcher beat.",
            float(age) if age is not None else float("nan"),
        ),
        labelled_gauge(
            "nbcron_notifications_pending",
            "Notifications waiting to be delivered.",
            "channel",
            snapshot["notifications_pending"],
            "channel",
            "n",
        ),
    ]


class StoreCollector(Collector):
    """Cluster-wide numbers read from Postgres at scrape time."""

    def __init__(self, *, heartbeat_timeout: float) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.store: Store | None = None

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        yield gauge(
            "nbcron_database_up", "1 when Postgres answered this scrape.", float(bool(snapshot))
        )
        if not snapshot:
            return
        yield from counter_families(snapshot["counters"])
        yield from histogram_families(snapshot["counters"], snapshot["bounds"])
        yield from queue_families(snapshot["queues"])
        yield from liveness_families(snapshot)

    def _snapshot(self) -> dict[str, Any] | None:
        if self.store is None:
            return None
        try:
            return self.store.metrics_snapshot(timeout=self.heartbeat_timeout)
        except NbcronError:
            return None


class ApiMetrics:
    """One API process's registry: its request metrics plus the cluster-wide collector."""

    def __init__(self, *, heartbeat_timeout: float) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "nbcron_api_requests",
            "API requests, by method, route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "nbcron_api_request_duration_seconds",
            "Time to the response's first byte, by method, route and status.",
            ["method", "route", "status"],
            buckets=API_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.cluster = StoreCollector(heartbeat_timeout=heartbeat_timeout)
        self.registry.register(self.cluster)
        if sys.platform.startswith("linux"):
            ProcessCollector(registry=self.registry)

    def observe(self, *, method: str, route: str, status: int, seconds: float) -> None:
        labels = (method, route, str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def render(self, store: Store) -> bytes:
        """The Prometheus text exposition of everything this process knows."""
        self.cluster.store = store
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: count requests and time them to the first byte, by route template."""

    def __init__(self, app: Any, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, seen = time.perf_counter(), dict[str, int]()

        async def timed_send(message: Any) -> None:
            if message["type"] == "http.response.start" and not seen:
                seen["status"] = message["status"]
                self._observe(scope, message["status"], started)
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except Exception as exc:  # raised by a middleware; the app's handler answers it
            if not seen:
                self._observe(scope, int(getattr(exc, "status_code", 500)), started)
            raise

    def _observe(self, scope: Any, status: int, started: float) -> None:
        route = scope.get("path_template") or "unmatched"
        self.metrics.observe(
            method=scope.get("method", "?"),
            route=route,
            status=status,
            seconds=time.perf_counter() - started,
        )


def kernel_pool_ready(names: Iterable[str]) -> int | None:
    """Warm kernels this worker process holds, or None when it has no pool.

    Looked up without importing the notebook machinery: a worker that never started a pool
    reports nothing.
    """
    module = sys.modules.get("executors.kernels")
    pool = module.active_pool() if module is not None else None
    if pool is None:
        return None
    return sum(pool.ready_count(name) for name in names)
