"""Store reads as Polars frames for the dashboard.

History is aggregated in SQL (`dashboard_*` blocks of service/queries.sql) over a bounded time
window, so the overview costs the same with a thousand runs or a million: Python only ever sees
one row per (hour, status) and one per task.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import polars as pl

from service.models import Run, RunStatus, Task
from service.schedule import slots_between

WINDOWS: dict[str, int] = {"1 hour": 1, "6 hours": 6, "24 hours": 24, "7 days": 168, "30 days": 720}
STATUSES: tuple[str, ...] = tuple(s.value for s in RunStatus)
FINISHED_OK = "succeeded"
FINISHED_BAD = ("failed", "timed_out")
REPORT_NAME = "report.html"
UTC_US = pl.Datetime("us", "UTC")

PER_HOUR_SCHEMA = {"hour": UTC_US, "status": pl.String, "n": pl.Int64}
DURATION_SCHEMA = {"task": pl.String, "runs": pl.Int64, "p50": pl.Float64, "p95": pl.Float64}
RUNNING_SCHEMA = {
    "id": pl.Int64,
    "task": pl.String,
    "attempt": pl.Int64,
    "worker": pl.String,
    "started_at": UTC_US,
    "elapsed": pl.Float64,
}
WORKER_SCHEMA = {
    "name": pl.String,
    "hostname": pl.String,
    "running": pl.Int64,
    "threads": pl.Int64,
    "last_heartbeat": UTC_US,
    "alive": pl.Boolean,
}
UPCOMING_SCHEMA = {"at": UTC_US, "task": pl.String, "schedule": pl.String}
TASK_LIST_SCHEMA = {
    "name": pl.String,
    "executor": pl.String,
    "schedule": pl.String,
    "enabled": pl.Boolean,
    "tags": pl.List(pl.String),
    "last_run_id": pl.Int64,
    "last_status": pl.String,
    "last_queued_at": UTC_US,
}
TASK_RUNS_SCHEMA = {
    "id": pl.Int64,
    "status": pl.String,
    "trigger": pl.String,
    "attempt": pl.Int64,
    "queued_at": UTC_US,
    "started_at": UTC_US,
    "finished_at": UTC_US,
    "duration": pl.Float64,
    "worker": pl.String,
    "exit_code": pl.Int64,
}
ARTIFACT_SCHEMA = {
    "name": pl.String,
    "content_type": pl.String,
    "size": pl.Int64,
    "created_at": UTC_US,
}


class DashboardStore(Protocol):
    """What the dashboard needs from service.store.Store (a fake in unit tests)."""

    def dashboard_rows(self, query: str, /, **params: Any) -> list[dict[str, Any]]: ...

    def list_workers(self, *, timeout: float) -> list[dict[str, Any]]: ...

    def get_task(self, ref: str | int) -> Task: ...

    def get_run(self, run_id: int) -> Run: ...

    def get_logs(self, run_id: int, *, offset: int = 0) -> list[dict[str, Any]]: ...


@dataclass(frozen=True, kw_only=True)
class Filters:
    """What the visitor narrowed the view to; None means everything."""

    task: str | None = None
    status: str | None = None
    tag: str | None = None
    hours: int = 24

    def since(self, now: datetime) -> datetime:
        """The start of the time window."""
        return now - timedelta(hours=self.hours)

    def params(self, now: datetime) -> dict[str, Any]:
        """The SQL parameters every filtered dashboard query takes."""
        return {"task": self.task, "status": self.status, "tag": self.tag, "since": self.since(now)}


@dataclass(frozen=True, kw_only=True)
class QueueDepth:
    """Queued runs, and how many of them are already due (not waiting for a retry delay)."""

    queued: int
    due: int


@dataclass(frozen=True, kw_only=True)
class Overview:
    """Everything the overview page shows, read in one go."""

    filters: Filters
    now: datetime
    per_hour: pl.DataFrame
    durations: pl.DataFrame
    running: pl.DataFrame
    queue: QueueDepth
    workers: pl.DataFrame
    upcoming: pl.DataFrame
    tasks: pl.DataFrame

    @property
    def total(self) -> int:
        """Runs queued in the window."""
        return int(self.per_hour["n"].sum())

    @property
    def success_rate(self) -> float | None:
        """Succeeded / (succeeded + failed + timed out) in the window; None with no finished run."""
        return success_rate(self.per_hour)


def frame(rows: list[dict[str, Any]], schema: dict[str, Any]) -> pl.DataFrame:
    """Rows as a frame with a fixed schema (so an empty result still has its columns)."""
    picked = [{k: row.get(k) for k in schema} for row in rows]
    return pl.DataFrame(picked, schema=schema)


def success_rate(per_hour: pl.DataFrame) -> float | None:
    """The share of finished runs that succeeded, from a (hour, status, n) frame."""
    by_status = per_hour.group_by("status").agg(pl.col("n").sum())
    counts = dict(zip(by_status["status"].to_list(), by_status["n"].to_list(), strict=True))
    good = counts.get(FINISHED_OK, 0)
    finished = good + sum(counts.get(s, 0) for s in FINISHED_BAD)
    return good / finished if finished else None


def stacked_by_hour(per_hour: pl.DataFrame) -> pl.DataFrame:
    """One row per hour, one column per status (zeros filled), for a stacked bar chart."""
    base = pl.DataFrame({"hour": per_hour["hour"].unique().sort()}, schema={"hour": UTC_US})
    for status in STATUSES:
        counts = per_hour.filter(pl.col("status") == status).select(
            "hour", pl.col("n").alias(status)
        )
        base = base.join(counts, on="hour", how="left")
    return base.with_columns(pl.col(list(STATUSES)).fill_null(0))


def runs_per_hour(store: DashboardStore, filters: Filters, now: datetime) -> pl.DataFrame:
    """(hour, status, n) over the window."""
    rows = store.dashboard_rows("dashboard_runs_per_hour", **filters.params(now))
    return frame(rows, PER_HOUR_SCHEMA)


def duration_percentiles(
    store: DashboardStore, filters: Filters, now: datetime, *, limit: int = 20
) -> pl.DataFrame:
    """p50 and p95 run duration (seconds) per task over the window, slowest p95 first."""
    params = filters.params(now) | {"limit": limit}
    return frame(store.dashboard_rows("dashboard_duration_percentiles", **params), DURATION_SCHEMA)


def running_now(store: DashboardStore, filters: Filters, *, limit: int = 50) -> pl.DataFrame:
    """Runs executing right now, oldest first."""
    rows = store.dashboard_rows(
        "dashboard_running_now", task=filters.task, tag=filters.tag, limit=limit
    )
    return frame(rows, RUNNING_SCHEMA)


def queue_depth(store: DashboardStore) -> QueueDepth:
    """How many runs wait in the queue."""
    row = store.dashboard_rows("dashboard_queue_depth")[0]
    return QueueDepth(queued=int(row["queued"]), due=int(row["due"]))


def workers(store: DashboardStore, *, timeout: float) -> pl.DataFrame:
    """Registered workers with their last heartbeat, live ones first."""
    rows = frame(store.list_workers(timeout=timeout), WORKER_SCHEMA)
    return rows.sort(["alive", "name"], descending=[True, False])


def tasks(
    store: DashboardStore, *, task: str | None = None, tag: str | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    """Task rows (name, schedule, tags, ...) in name order."""
    return store.dashboard_rows("dashboard_tasks", task=task, tag=tag, limit=limit)


def task_names(store: DashboardStore) -> list[str]:
    """Every task's name, for the task filter."""
    return [row["name"] for row in tasks(store)]


def tag_names(store: DashboardStore) -> list[str]:
    """Every tag in use, for the tag filter."""
    return [row["tag"] for row in store.dashboard_rows("dashboard_tags")]


def upcoming_slots(
    rows: list[dict[str, Any]],
    now: datetime,
    *,
    hours: int = 24,
    per_task: int = 48,
    limit: int = 100,
) -> pl.DataFrame:
    """The next fire times of enabled scheduled tasks within `hours`, soonest first."""
    end = now + timedelta(hours=hours)
    found = [
        {"at": slot, "task": row["name"], "schedule": row["schedule"]}
        for row in rows
        if row["enabled"] and row["schedule"]
        for slot in slots_between(
            row["schedule"], row["timezone"], start=now, end=end, limit=per_task
        )
    ]
    return frame(found, UPCOMING_SCHEMA).sort(["at", "task"]).head(limit)


def overview(
    store: DashboardStore,
    filters: Filters,
    *,
    now: datetime | None = None,
    heartbeat_timeout: float = 30.0,
) -> Overview:
    """Everything the overview shows, aggregated in SQL over the filter's window."""
    at = now or datetime.now(UTC)
    task_rows = tasks(store, task=filters.task, tag=filters.tag)
    return Overview(
        filters=filters,
        now=at,
        per_hour=runs_per_hour(store, filters, at),
        durations=duration_percentiles(store, filters, at),
        running=running_now(store, filters),
        queue=queue_depth(store),
        workers=workers(store, timeout=heartbeat_timeout),
        upcoming=upcoming_slots(task_rows, at),
        tasks=frame(task_rows, TASK_LIST_SCHEMA),
    )


def task_runs(
    store: DashboardStore,
    task_id: int,
    *,
    status: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> pl.DataFrame:
    """A task's latest runs, newest first, with their duration in seconds."""
    rows = store.dashboard_rows(
        "dashboard_task_runs", task_id=task_id, status=status, since=since, limit=limit
    )
    return frame(rows, TASK_RUNS_SCHEMA)


def duration_trend(runs: pl.DataFrame) -> pl.DataFrame:
    """Finished runs' durations in time order, for the task page's trend line."""
    done = runs.filter(pl.col("duration").is_not_null() & pl.col("finished_at").is_not_null())
    return done.select("id", "finished_at", "duration", "status").sort("finished_at")


def latest_report_run(store: DashboardStore, task_id: int) -> int | None:
    """The newest succeeded run of the task that has an HTML report, if any."""
    rows = store.dashboard_rows("dashboard_latest_report", task_id=task_id, name=REPORT_NAME)
    return int(rows[0]["run_id"]) if rows else None


def run_artifacts(store: DashboardStore, run_id: int) -> pl.DataFrame:
    """A run's artifacts (name, content type, size)."""
    return frame(store.dashboard_rows("dashboard_run_artifacts", run_id=run_id), ARTIFACT_SCHEMA)


def artifact(store: DashboardStore, run_id: int, name: str) -> tuple[str, bytes] | None:
    """One artifact's content type and bytes, or None."""
    rows = store.dashboard_rows("dashboard_artifact", run_id=run_id, name=name)
    return (rows[0]["content_type"], bytes(rows[0]["data"])) if rows else None


def run_log(store: DashboardStore, run_id: int, *, offset: int = 0) -> tuple[str, int]:
    """A run's log text from chunk `offset`, and the offset to ask for next time."""
    chunks = store.get_logs(run_id, offset=offset)
    next_offset = chunks[-1]["seq"] + 1 if chunks else offset
    return "".join(c["data"] for c in chunks), next_offset
