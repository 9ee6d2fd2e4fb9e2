"""Dashboard pieces without a database: frames, filters, schedule, escaping, sessions, roles."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
from tornado.web import create_signed_value

from dashboards import data
from dashboards.data import Filters
from dashboards.render import esc, seconds, table, task_link, text_column
from dashboards.views import OverviewView, TaskView
from dashboards.web import COOKIE, Sessions, WebContext, safe_next
from service.auth import Principal
from service.models import Role, Run, RunStatus, Task
from tests.support import task_record

NOW = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
XSS = "<img src=x onerror=alert(1)>"


def _task(**over: Any) -> Task:
    base = {"name": "etl", "created_at": NOW, "updated_at": NOW}
    return task_record(**(base | over))


@dataclass
class FakeStore:
    """Canned rows per query name; remembers every call."""

    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    audits: list[dict[str, Any]] = field(default_factory=list)

    def dashboard_rows(self, query: str, /, **params: Any) -> list[dict[str, Any]]:
        self.calls.append((query, params))
        default = [{"queued": 0, "due": 0}] if query == "dashboard_queue_depth" else []
        return self.rows.get(query, default)

    def list_workers(self, *, timeout: float) -> list[dict[str, Any]]:
        return self.rows.get("workers", [])

    def get_logs(self, run_id: int, *, offset: int = 0) -> list[dict[str, Any]]:
        chunks = [{"seq": 0, "data": "a\n"}, {"seq": 1, "data": "b\n"}]
        return [c for c in chunks if c["seq"] >= offset]

    def create_run(
        self, task: Task, *, trigger: str, parameters: dict[str, Any]
    ) -> tuple[Run, bool]:
        run = Run(
            id=len(self.runs) + 1,
            task_id=task.id,
            status=RunStatus.QUEUED,
            trigger=trigger,
            attempt=1,
            retry_of=None,
            parameters=parameters,
            queue="default",
            scheduled_for=None,
            not_before=NOW,
            queued_at=NOW,
            started_at=None,
            finished_at=None,
            worker=None,
            exit_code=None,
            error=None,
            reason=None,
            cancel_requested=False,
        )
        self.runs.append(run)
        return run, True

    def audit(self, **row: Any) -> None:
        self.audits.append(row)

    def get_task(self, ref: str | int) -> Task:
        return _task()


def _per_hour(*rows: tuple[int, str, int]) -> pl.DataFrame:
    return data.frame(
        [{"hour": NOW - timedelta(hours=h), "status": s, "n": n} for h, s, n in rows],
        data.PER_HOUR_SCHEMA,
    )


# -- frames ---------------------------------------------------------------------------------


def test_an_empty_result_keeps_its_columns() -> None:
    empty = data.frame([], data.DURATION_SCHEMA)
    assert empty.height == 0 and empty.columns == ["task", "runs", "p50", "p95"]


def test_success_rate_counts_finished_runs_only() -> None:
    per_hour = _per_hour(
        (1, "succeeded", 7), (1, "failed", 2), (2, "timed_out", 1), (0, "running", 5)
    )
    assert data.success_rate(per_hour) == pytest.approx(0.7)
    assert data.success_rate(_per_hour((0, "queued", 3))) is None
    assert data.success_rate(data.frame([], data.PER_HOUR_SCHEMA)) is None


def test_stacked_by_hour_has_every_status_with_zeros() -> None:
    stacked = data.stacked_by_hour(_per_hour((2, "failed", 1), (1, "succeeded", 4)))
    assert stacked.columns == ["hour", *data.STATUSES]
    assert stacked["succeeded"].to_list() == [0, 4]
    assert stacked["failed"].to_list() == [1, 0]
    assert stacked["hour"].is_sorted()


def test_duration_trend_keeps_finished_runs_in_time_order() -> None:
    runs = data.frame(
        [
            {"id": 3, "status": "running", "finished_at": None, "duration": None},
            {"id": 2, "status": "failed", "finished_at": NOW, "duration": 4.0},
            {
                "id": 1,
                "status": "succeeded",
                "finished_at": NOW - timedelta(hours=1),
                "duration": 2.0,
            },
        ],
        data.TASK_RUNS_SCHEMA,
    )
    assert data.duration_trend(runs)["id"].to_list() == [1, 2]


# -- filters reach the SQL ------------------------------------------------------------------


def test_overview_passes_the_filters_and_a_bounded_window_to_sql() -> None:
    store = FakeStore()
    view = data.overview(store, Filters(task="etl", status="failed", tag="x", hours=6), now=NOW)
    by_name = dict(store.calls)
    assert by_name["dashboard_runs_per_hour"] == {
        "task": "etl",
        "status": "failed",
        "tag": "x",
        "since": NOW - timedelta(hours=6),
    }
    assert by_name["dashboard_duration_percentiles"]["since"] == NOW - timedelta(hours=6)
    assert by_name["dashboard_running_now"]["task"] == "etl"
    assert by_name["dashboard_tasks"] == {"task": "etl", "tag": "x", "limit": 1000}
    assert view.total == 0 and view.success_rate is None
    assert all(name.startswith("dashboard_") for name, _ in store.calls)


def test_upcoming_lists_the_next_24_hours_of_enabled_schedules() -> None:
    rows = [
        {"name": "quarter", "schedule": "*/15 * * * *", "timezone": "UTC", "enabled": True},
        {"name": "paris", "schedule": "0 7 * * *", "timezone": "Europe/Paris", "enabled": True},
        {"name": "paused", "schedule": "* * * * *", "timezone": "UTC", "enabled": False},
        {"name": "manual", "schedule": None, "timezone": "UTC", "enabled": True},
    ]
    slots = data.upcoming_slots(rows, NOW, per_task=10, limit=100)
    assert set(slots["task"]) == {"quarter", "paris"}
    assert slots.filter(pl.col("task") == "quarter").height == 10  # capped per task
    paris = slots.filter(pl.col("task") == "paris")["at"].to_list()
    assert paris == [datetime(2026, 3, 29, 5, 0, tzinfo=UTC)]  # 07:00 CEST, the DST day
    assert slots["at"].is_sorted()
    assert all(NOW <= at <= NOW + timedelta(hours=24) for at in slots["at"])


def test_run_log_resumes_from_the_offset() -> None:
    store = FakeStore()
    assert data.run_log(store, 1) == ("a\nb\n", 2)
    assert data.run_log(store, 1, offset=2) == ("", 2)


# -- escaping -------------------------------------------------------------------------------


def test_text_is_escaped_everywhere_it_is_shown() -> None:
    assert esc(XSS) == "&lt;img src=x onerror=alert(1)&gt;"
    link = task_link(XSS)
    assert "<img" not in link and "%3Cimg%20src%3Dx" in link
    html = table([{"name": XSS}], [text_column("name", "name")], empty="-", id="t")
    assert "<img" not in html and "&lt;img" in html
    assert "<img" not in table([], [], empty=XSS, id="t")


def test_overview_tables_escape_task_names() -> None:
    store = FakeStore(
        rows={
            "dashboard_duration_percentiles": [{"task": XSS, "runs": 1, "p50": 1.0, "p95": 2.0}],
            "dashboard_tasks": [
                {
                    "name": XSS,
                    "executor": "shell",
                    "schedule": None,
                    "timezone": "UTC",
                    "enabled": True,
                    "tags": [XSS],
                    "last_run_id": None,
                    "last_status": None,
                    "last_queued_at": None,
                }
            ],
        }
    )
    view = OverviewView(store, filters=Filters())
    view.refresh()
    for pane in (view.duration_table, view.tasks):
        assert "<img" not in pane.object and "&lt;img" in pane.object


def test_durations_read_for_people() -> None:
    assert [seconds(v) for v in (None, 0.42, 75, 7300)] == ["-", "0.4 s", "1 min 15 s", "2 h 1 min"]


# -- roles ----------------------------------------------------------------------------------


def _view(store: FakeStore, role: Role, *, revoked: bool = False) -> TaskView:
    who = Principal(key_id=1, name=f"a-{role.value}", role=role)
    return TaskView(store, _task(), principal=who, authorize=lambda: None if revoked else who)


def test_a_viewer_gets_a_disabled_button_and_the_server_refuses_anyway() -> None:
    store = FakeStore()
    view = _view(store, Role.VIEWER)
    assert view.button.disabled
    assert view.trigger() is None
    assert store.runs == [] and store.audits == []
    assert "Refused" in view.notice.object


def test_a_revoked_key_cannot_trigger() -> None:
    store = FakeStore()
    assert _view(store, Role.OPERATOR, revoked=True).trigger() is None
    assert store.runs == []


def test_an_operator_triggers_like_the_api_does() -> None:
    store = FakeStore()
    view = _view(store, Role.OPERATOR)
    assert not view.button.disabled
    run = view.trigger()
    assert run is not None and run.trigger == "manual" and run.parameters == {}
    assert store.audits == [
        {
            "actor": "a-operator",
            "action": "task.trigger",
            "object_type": "task",
            "object_id": "1",
            "remote": None,
            "detail": {"run_id": run.id, "via": "dashboard"},
        }
    ]


# -- sessions -------------------------------------------------------------------------------


def test_only_same_site_paths_are_followed_after_login() -> None:
    assert safe_next("/?task=etl") == "/?task=etl"
    for bad in (None, "", "https://evil.example/", "//evil.example/", "/\\evil.example", "x"):
        assert safe_next(bad) == "/"


def test_sessions_expire_and_close() -> None:
    sessions = Sessions(ttl=60)
    sid = sessions.open("nbc_key")
    assert sessions.key(sid) == "nbc_key" and sessions.key("other") is None
    sessions.close(sid)
    assert sessions.key(sid) is None
    assert Sessions(ttl=-1).key(Sessions(ttl=-1).open("k")) is None


def test_a_forged_or_foreign_cookie_opens_nothing() -> None:
    ctx = WebContext(store=None, secret="s3cret")  # type: ignore[arg-type]
    sid = ctx.sessions.open("nbc_key")
    good = create_signed_value("s3cret", COOKIE, sid)
    assert ctx.sid(good) == sid
    assert ctx.sid(create_signed_value("other", COOKIE, sid)) is None
    assert ctx.sid(sid) is None and ctx.sid(None) is None
