"""The three pages: overview, task and run. Each has a `layout` and a `refresh()` that re-reads
the store and updates its panes in place (the periodic callback calls it; no page reload)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import panel as pn

from dashboards import data
from dashboards.data import REPORT_NAME, STATUSES, WINDOWS, DashboardStore, Filters
from dashboards.render import (
    Column,
    DurationChart,
    RunsPerHourChart,
    TrendChart,
    badge,
    esc,
    facts,
    html_pane,
    run_link,
    seconds,
    table,
    task_link,
    text_column,
    when,
)
from service.auth import Principal
from service.models import Role, Run, Task

ALL = ""
LOG_SHOWN_CHARS = 200_000

Authorizer = Callable[[], Principal | None]


def _select(name: str, options: list[str], value: str, *, all_label: str) -> pn.widgets.Select:
    choices = {all_label: ALL} | {o: o for o in options}
    return pn.widgets.Select(
        label=name, options=choices, value=value if value in choices.values() else ALL, width=190
    )


def _window_select(hours: int) -> pn.widgets.Select:
    value = hours if hours in WINDOWS.values() else 24
    return pn.widgets.Select(label="Time window", options=WINDOWS, value=value, width=140)


def _card(label: str, value: str, id: str) -> str:
    return (
        f'<div class="card" id="{id}"><div class="v">{esc(value)}</div>'
        f'<div class="k">{esc(label)}</div></div>'
    )


def _section(title: str, pane: pn.pane.HTML) -> pn.Column:
    return pn.Column(html_pane(f"<h3>{esc(title)}</h3>"), pane, sizing_mode="stretch_width")


def _last_run(row: dict[str, Any]) -> str:
    if row["last_run_id"] is None:
        return '<span class="muted">never ran</span>'
    stamp = esc(when(row["last_queued_at"]))
    return f"{run_link(row['last_run_id'])} {badge(row['last_status'])} {stamp}"


def _heartbeat_age(row: dict[str, Any], now: datetime) -> str:
    beat = row["last_heartbeat"]
    return f"{when(beat)} ({seconds((now - beat).total_seconds())} ago)" if beat else "-"


DURATION_COLUMNS = [
    Column("task", lambda r: task_link(r["task"])),
    text_column("runs", "runs"),
    text_column("p50", "p50", seconds),
    text_column("p95", "p95", seconds),
]
RUNNING_COLUMNS = [
    Column("run", lambda r: run_link(r["id"])),
    Column("task", lambda r: task_link(r["task"])),
    text_column("attempt", "attempt"),
    text_column("worker", "worker"),
    text_column("started (UTC)", "started_at", when),
    text_column("elapsed", "elapsed", seconds),
]
UPCOMING_COLUMNS = [
    text_column("at (UTC)", "at", when),
    Column("task", lambda r: task_link(r["task"])),
    text_column("schedule", "schedule"),
]
TASK_COLUMNS = [
    Column("task", lambda r: task_link(r["name"])),
    text_column("executor", "executor"),
    text_column("schedule", "schedule"),
    Column("state", lambda r: "enabled" if r["enabled"] else "paused"),
    text_column("tags", "tags", ", ".join),
    Column("last run (UTC)", _last_run),
]
HISTORY_COLUMNS = [
    Column("run", lambda r: run_link(r["id"])),
    Column("status", lambda r: badge(r["status"])),
    text_column("trigger", "trigger"),
    text_column("attempt", "attempt"),
    text_column("queued (UTC)", "queued_at", when),
    text_column("started", "started_at", when),
    text_column("finished", "finished_at", when),
    text_column("duration", "duration", seconds),
    text_column("worker", "worker"),
    text_column("exit", "exit_code"),
]
ARTIFACT_COLUMNS = [
    text_column("name", "name"),
    text_column("type", "content_type"),
    text_column("size", "size", lambda n: f"{n:,} bytes"),
]


class OverviewView:
    """Runs per hour, success rate, durations, running now, queue, workers, next 24 hours."""

    title = "Overview"

    def __init__(
        self,
        store: DashboardStore,
        *,
        filters: Filters,
        heartbeat_timeout: float = 30.0,
    ) -> None:
        self.store = store
        self.heartbeat_timeout = heartbeat_timeout
        self.task = _select("Task", [], filters.task or ALL, all_label="all tasks")
        self.status = _select(
            "Status", list(STATUSES), filters.status or ALL, all_label="all statuses"
        )
        self.tag = _select("Tag", [], filters.tag or ALL, all_label="all tags")
        self.window = _window_select(filters.hours)
        self.kpis = html_pane()
        self.per_hour = RunsPerHourChart()
        self.durations = DurationChart()
        self.duration_table = html_pane()
        self.running = html_pane()
        self.workers = html_pane()
        self.upcoming = html_pane()
        self.tasks = html_pane()
        for widget in (self.task, self.status, self.tag, self.window):
            widget.param.watch(lambda _: self.refresh(), "value")
        self.layout = pn.Column(
            pn.Row(self.task, self.status, self.tag, self.window),
            self.kpis,
            self.per_hour.pane,
            pn.Row(self.durations.pane, _section("Duration per task", self.duration_table)),
            pn.Row(_section("Tasks", self.tasks), _section("Running now", self.running)),
            pn.Row(_section("Workers", self.workers), _section("Next 24 hours", self.upcoming)),
            sizing_mode="stretch_width",
        )

    def filters(self) -> Filters:
        """The filters as the widgets show them."""
        return Filters(
            task=self.task.value or None,
            status=self.status.value or None,
            tag=self.tag.value or None,
            hours=int(self.window.value),
        )

    def refresh(self) -> None:
        """Read the store again and update every pane."""
        self._refresh_options()
        view = data.overview(self.store, self.filters(), heartbeat_timeout=self.heartbeat_timeout)
        self.show(view)

    def show(self, view: data.Overview) -> None:
        """Put one overview's numbers on screen."""
        self.kpis.object = self._kpis(view)
        self.per_hour.update(view.per_hour)
        self.durations.update(view.durations)
        self.duration_table.object = table(
            view.durations.to_dicts(), DURATION_COLUMNS, empty="no finished runs", id="durations"
        )
        self.running.object = table(
            view.running.to_dicts(), RUNNING_COLUMNS, empty="nothing is running", id="running"
        )
        self.workers.object = self._workers(view)
        self.upcoming.object = table(
            view.upcoming.to_dicts(),
            UPCOMING_COLUMNS,
            empty="nothing scheduled",
            id="upcoming",
            scroll=True,
        )
        self.tasks.object = table(
            view.tasks.to_dicts(), TASK_COLUMNS, empty="no tasks", id="tasks", scroll=True
        )

    def _kpis(self, view: data.Overview) -> str:
        rate = view.success_rate
        label = next(
            (k for k, v in WINDOWS.items() if v == view.filters.hours), f"{view.filters.hours} h"
        )
        alive = int(view.workers["alive"].sum()) if view.workers.height else 0
        cards = [
            _card(f"runs, last {label}", f"{view.total:,}", "kpi-runs"),
            _card("success rate", "-" if rate is None else f"{rate:.1%}", "kpi-success"),
            _card("running now", str(view.running.height), "kpi-running"),
            _card(f"queued ({view.queue.due} due)", str(view.queue.queued), "kpi-queue"),
            _card("workers alive", f"{alive}/{view.workers.height}", "kpi-workers"),
        ]
        return f'<div class="cards">{"".join(cards)}</div>'

    def _workers(self, view: data.Overview) -> str:
        columns = [
            text_column("worker", "name"),
            text_column("host", "hostname"),
            Column("load", lambda r: esc(f"{r['running']}/{r['threads']}")),
            Column("last heartbeat (UTC)", lambda r: esc(_heartbeat_age(r, view.now))),
            Column("state", lambda r: "alive" if r["alive"] else "gone"),
        ]
        return table(view.workers.to_dicts(), columns, empty="no workers registered", id="workers")

    def _refresh_options(self) -> None:
        for widget, values, label in (
            (self.task, data.task_names(self.store), "all tasks"),
            (self.tag, data.tag_names(self.store), "all tags"),
        ):
            options = {label: ALL} | {v: v for v in values}
            if options != widget.options:
                widget.options = options


class TaskView:
    """A task's facts, trigger button, run history, duration trend and latest report."""

    title = "Task"

    def __init__(
        self,
        store: Any,
        task: Task,
        *,
        principal: Principal,
        authorize: Authorizer,
        remote: str | None = None,
    ) -> None:
        self.store, self.task, self.authorize, self.remote = store, task, authorize, remote
        can_trigger = principal.role.allows(Role.OPERATOR)
        self.button = pn.widgets.Button(
            label="Run now",
            color="primary",
            disabled=not can_trigger,
            description=None if can_trigger else "needs the operator role",
            width=140,
        )
        self.button.on_click(lambda _: self.trigger())
        self.notice = html_pane(
            ""
            if can_trigger
            else '<p class="muted" id="trigger-note">'
            "Your key is a viewer key: you can look, not trigger.</p>"
        )
        self.status = _select("Status", list(STATUSES), ALL, all_label="all statuses")
        self.status.param.watch(lambda _: self.refresh(), "value")
        self.info = html_pane()
        self.history = html_pane()
        self.trend = TrendChart()
        self.report = html_pane()
        self._report_run: int | bool | None = False
        self.layout = pn.Column(
            self.info,
            pn.Row(self.button, self.notice),
            self.trend.pane,
            pn.Row(html_pane("<h3>Run history</h3>"), self.status),
            self.history,
            html_pane("<h3>Latest report</h3>"),
            self.report,
            sizing_mode="stretch_width",
        )

    def trigger(self) -> Run | None:
        """Queue a run as the API does (run + audit row); refused unless the key may operate."""
        principal = self.authorize()
        if principal is None or not principal.role.allows(Role.OPERATOR):
            self.notice.object = (
                '<p class="notice error" id="trigger-notice">'
                "Refused: triggering needs the operator role.</p>"
            )
            return None
        run, _ = self.store.create_run(self.task, trigger="manual", parameters={})
        self.store.audit(
            actor=principal.name,
            action="task.trigger",
            object_type="task",
            object_id=str(self.task.id),
            remote=self.remote,
            detail={"run_id": run.id, "via": "dashboard"},
        )
        self.notice.object = (
            f'<p class="notice" id="trigger-notice">Run {run_link(run.id)} queued.</p>'
        )
        self.refresh()
        return run

    def refresh(self) -> None:
        """Re-read the task, its runs and its latest report."""
        self.task = self.store.get_task(self.task.id)
        runs = data.task_runs(self.store, self.task.id, status=self.status.value or None)
        self.info.object = self._info()
        self.history.object = table(
            runs.to_dicts(), HISTORY_COLUMNS, empty="no runs yet", id="history"
        )
        self.trend.update(data.duration_trend(runs))
        self._show_report(data.latest_report_run(self.store, self.task.id))

    def _info(self) -> str:
        t = self.task
        schedule = f"{t.schedule} ({t.timezone})" if t.schedule else "on demand"
        return f'<h2 id="task-name">{esc(t.name)}</h2>' + facts(
            [
                ("description", esc(t.description) or '<span class="muted">-</span>'),
                ("executor", esc(t.executor)),
                ("schedule", esc(schedule)),
                ("state", "enabled" if t.enabled else "paused"),
                ("next fire (UTC)", esc(when(t.next_fire_at))),
                ("tags", esc(", ".join(t.tags)) or "-"),
                ("queue", esc(t.queue)),
            ]
        )

    def _show_report(self, run_id: int | None) -> None:
        if run_id == self._report_run:
            return  # keep the iframe as it is: reloading it every refresh would flicker
        self._report_run = run_id
        if run_id is None:
            self.report.object = (
                '<p class="empty" id="no-report">'
                "No report yet (a succeeded notebook run leaves one).</p>"
            )
            return
        src = f"/artifacts/{int(run_id)}/{REPORT_NAME}"
        self.report.object = (
            f'<p class="muted">From run {run_link(run_id)} · <a href="{src}" target="_blank" '
            f'rel="noopener">open</a> · <a href="{src}?download=1">download</a></p>'
            f'<iframe class="report" id="report" sandbox="allow-scripts" src="{src}" '
            f'title="report of run {int(run_id)}"></iframe>'
        )


class RunView:
    """One run: status, timings, parameters, live log, artifacts."""

    title = "Run"

    def __init__(self, store: DashboardStore, run_id: int) -> None:
        self.store, self.run_id = store, run_id
        self.log_text, self.log_offset = "", 0
        self.summary = html_pane()
        self.params = html_pane()
        self.log = html_pane()
        self.artifacts = html_pane()
        self.layout = pn.Column(
            self.summary,
            html_pane("<h3>Parameters</h3>"),
            self.params,
            html_pane("<h3>Log</h3>"),
            self.log,
            html_pane("<h3>Artifacts</h3>"),
            self.artifacts,
            sizing_mode="stretch_width",
        )

    def refresh(self) -> None:
        """Re-read the run, append new log output, list artifacts."""
        run = self.store.get_run(self.run_id)
        self.summary.object = self._summary(run)
        params = json.dumps(run.parameters, indent=2, sort_keys=True)
        self.params.object = f'<pre class="params" id="params">{esc(params)}</pre>'
        text, self.log_offset = data.run_log(self.store, self.run_id, offset=self.log_offset)
        if text or not self.log.object:
            self.log_text = (self.log_text + text)[-LOG_SHOWN_CHARS:]
            self.log.object = f'<pre id="log">{esc(self.log_text) or "(no output yet)"}</pre>'
        self.artifacts.object = table(
            data.run_artifacts(self.store, self.run_id).to_dicts(),
            [*ARTIFACT_COLUMNS, Column("", self._artifact_links)],
            empty="no artifacts",
            id="artifacts",
        )

    def _artifact_links(self, row: dict[str, Any]) -> str:
        src = f"/artifacts/{int(self.run_id)}/{esc(row['name'])}"
        return (
            f'<a href="{src}" target="_blank" rel="noopener">open</a> · '
            f'<a href="{src}?download=1">download</a>'
        )

    def _summary(self, run: Run) -> str:
        duration = (
            (run.finished_at - run.started_at).total_seconds()
            if run.finished_at and run.started_at
            else None
        )
        retry = run_link(run.retry_of) if run.retry_of else "-"
        task = task_link(run.task_name or str(run.task_id))
        status = f'<span id="run-status">{badge(run.status.value)}</span>'
        head = f"<h2>Run #{int(run.id)} of {task} {status}</h2>"
        return head + facts(
            [
                ("trigger", esc(run.trigger)),
                (
                    "attempt",
                    f"{int(run.attempt)} (retry of {retry})"
                    if run.retry_of
                    else str(int(run.attempt)),
                ),
                ("scheduled for (UTC)", esc(when(run.scheduled_for))),
                ("queued", esc(when(run.queued_at))),
                ("started", esc(when(run.started_at))),
                ("finished", esc(when(run.finished_at))),
                ("duration", esc(seconds(duration))),
                ("worker", esc(run.worker or "-")),
                ("exit code", esc("-" if run.exit_code is None else run.exit_code)),
                ("error", f"<pre>{esc(run.error)}</pre>" if run.error else "-"),
                ("reason", esc(run.reason or "-")),
            ]
        )


__all__ = ["OverviewView", "RunView", "TaskView"]
