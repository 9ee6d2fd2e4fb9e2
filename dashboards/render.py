"""HTML and chart building blocks. Every piece of text that comes from a task, a run or a log
goes through `esc` (or is drawn by Bokeh, which sets text, never markup)."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import panel as pn
import polars as pl
from bokeh.models import ColumnDataSource, DatetimeTickFormatter, FactorRange, HoverTool, Legend
from bokeh.plotting import figure
from bokeh.transform import dodge

from dashboards.data import STATUSES, stacked_by_hour

HOUR_MS = 3600 * 1000
STATUS_COLORS = {
    "queued": "#9aa5b1",
    "running": "#1f77b4",
    "succeeded": "#2ca02c",
    "failed": "#d62728",
    "timed_out": "#ff7f0e",
    "cancelled": "#9467bd",
    "missed": "#8c564b",
}
CSS = (
    """
:host { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; font-size: 14px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #e3e6ea; vertical-align: top; }
th { background: #f4f6f8; font-weight: 600; }
a { color: #0f6cbd; text-decoration: none; } a:hover { text-decoration: underline; }
h2 { margin: 0 0 .3rem 0; } h3 { margin: .2rem 0 .4rem 0; font-size: 1.05rem; }
.muted { color: #666; } .empty { color: #888; font-style: italic; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; color: #fff; font-size: 12px; }
"""
    + "".join(f".st-{s} {{ background: {c}; }}\n" for s, c in STATUS_COLORS.items())
    + """
.cards { display: flex; gap: 12px; flex-wrap: wrap; }
.card { background: #fff; border: 1px solid #e3e6ea; border-radius: 6px; padding: 10px 16px;
        min-width: 130px; }
.card .v { font-size: 1.6rem; font-weight: 600; } .card .k { color: #666; font-size: 12px; }
pre { background: #1e1e1e; color: #e8e8e8; padding: 10px; border-radius: 4px; overflow: auto;
      max-height: 480px; white-space: pre-wrap; word-break: break-all; margin: 0; }
.scroll { max-height: 360px; overflow-y: auto; }
pre.params { background: #f4f6f8; color: #222; }
iframe.report { width: 100%; height: 520px; border: 1px solid #e3e6ea; border-radius: 4px; }
.header { display: flex; align-items: center; gap: 18px; padding: 6px 0; }
.header .brand { font-weight: 700; font-size: 1.2rem; } .header .grow { flex: 1; }
.notice { padding: 6px 10px; border-radius: 4px; background: #e8f3ec; }
.notice.error { background: #fdecea; color: #b00020; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0; }
dl.facts dt { color: #666; } dl.facts dd { margin: 0; }
"""
)


def esc(value: Any) -> str:
    """Text as HTML text: `<img src=x>` shows as those characters."""
    return html.escape("" if value is None else str(value), quote=True)


def when(value: datetime | None) -> str:
    """A UTC timestamp, to the second."""
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def seconds(value: float | None) -> str:
    """A duration for people: 0.4 s, 12.0 s, 3 min 4 s, 2 h 5 min."""
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{int(value // 60)} min {int(value % 60)} s"
    return f"{int(value // 3600)} h {int(value % 3600 // 60)} min"


def task_link(name: str) -> str:
    """A link to a task's page."""
    return f'<a class="task-link" href="?task={esc(quote(name, safe=""))}">{esc(name)}</a>'


def run_link(run_id: int) -> str:
    """A link to a run's page."""
    return f'<a class="run-link" href="?run={int(run_id)}">#{int(run_id)}</a>'


def badge(status: str) -> str:
    """A run status as a coloured label."""
    known = status if status in STATUS_COLORS else "queued"
    return f'<span class="badge st-{known}">{esc(status)}</span>'


@dataclass(frozen=True)
class Column:
    """A table column: a header and a row → safe HTML function."""

    title: str
    cell: Callable[[dict[str, Any]], str]


def text_column(title: str, key: str, fmt: Callable[[Any], str] = str) -> Column:
    """A column showing one field, formatted then escaped."""
    return Column(title, lambda row: esc(fmt(row[key]) if row[key] is not None else "-"))


def table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[Column],
    *,
    empty: str,
    id: str,
    scroll: bool = False,
) -> str:
    """An HTML table (or a one-line note when there are no rows); `scroll` caps its height."""
    if not rows:
        return f'<p class="empty" id="{esc(id)}">{esc(empty)}</p>'
    head = "".join(f"<th>{esc(c.title)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{c.cell(row)}</td>" for c in columns) + "</tr>" for row in rows
    )
    html_table = (
        f'<table id="{esc(id)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    )
    return f'<div class="scroll">{html_table}</div>' if scroll else html_table


def facts(items: Sequence[tuple[str, str]]) -> str:
    """A definition list of (label, safe HTML) pairs."""
    inner = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items)
    return f'<dl class="facts">{inner}</dl>'


def html_pane(text: str = "", **kwargs: Any) -> pn.pane.HTML:
    """An HTML pane with the dashboard's styles; callers pass already-escaped HTML."""
    return pn.pane.HTML(text, stylesheets=[CSS], sizing_mode="stretch_width", **kwargs)


def epoch_ms(column: pl.Series) -> list[int]:
    """Datetimes as milliseconds since the epoch, what Bokeh's datetime axes expect."""
    return column.dt.epoch("ms").to_list()


def _figure(title: str, **kwargs: Any) -> Any:
    fig = figure(
        title=title,
        height=280,
        sizing_mode="stretch_width",
        toolbar_location=None,
        tools="",
        **kwargs,
    )
    fig.title.text_font_size = "13px"
    return fig


def _time_axis(fig: Any) -> None:
    """Readable UTC ticks, and at least an hour on screen (one run is not a microsecond axis)."""
    clock = "%H:%M:%S"
    fig.xaxis.formatter = DatetimeTickFormatter(
        microseconds=clock,
        milliseconds=clock,
        seconds=clock,
        minsec=clock,
        minutes="%H:%M",
        hourmin="%H:%M",
        hours="%H:%M",
        days="%b %d",
        months="%b %Y",
    )
    fig.x_range.min_interval = HOUR_MS
    fig.x_range.default_span = 2 * HOUR_MS


class RunsPerHourChart:
    """Runs per hour, stacked by status."""

    def __init__(self) -> None:
        self.source = ColumnDataSource({"hour": [], **{s: [] for s in STATUSES}})
        fig = _figure("Runs per hour by status (UTC)", x_axis_type="datetime")
        _time_axis(fig)
        renderers = fig.vbar_stack(
            list(STATUSES),
            x="hour",
            width=HOUR_MS * 0.85,
            source=self.source,
            color=[STATUS_COLORS[s] for s in STATUSES],
        )
        legend = Legend(items=[(s, [r]) for s, r in zip(STATUSES, renderers, strict=True)])
        fig.add_layout(legend, "right")
        tips = [("hour", "@hour{%F %H:00}"), *[(s, f"@{s}") for s in STATUSES]]
        fig.add_tools(HoverTool(tooltips=tips, formatters={"@hour": "datetime"}, mode="mouse"))
        self.pane = pn.pane.Bokeh(fig, sizing_mode="stretch_width", height=280)

    def update(self, per_hour: pl.DataFrame) -> None:
        stacked = stacked_by_hour(per_hour)
        self.source.data = {
            "hour": epoch_ms(stacked["hour"]),
            **{s: stacked[s].to_list() for s in STATUSES},
        }


class DurationChart:
    """p50 and p95 run duration per task, one pair of bars per task."""

    def __init__(self) -> None:
        self.source = ColumnDataSource({"task": [], "p50": [], "p95": []})
        self.range = FactorRange(factors=[])
        fig = _figure("Duration per task, seconds (p50, p95)", y_range=self.range)
        fig.hbar(
            y=dodge("task", 0.18, range=self.range),
            right="p50",
            height=0.34,
            source=self.source,
            color="#1f77b4",
            legend_label="p50",
        )
        fig.hbar(
            y=dodge("task", -0.18, range=self.range),
            right="p95",
            height=0.34,
            source=self.source,
            color="#ff7f0e",
            legend_label="p95",
        )
        fig.legend.location = "bottom_right"
        fig.add_tools(HoverTool(tooltips=[("task", "@task"), ("p50", "@p50 s"), ("p95", "@p95 s")]))
        self.pane = pn.pane.Bokeh(fig, sizing_mode="stretch_width", height=280)

    def update(self, durations: pl.DataFrame) -> None:
        ordered = durations.reverse()  # slowest at the top
        self.range.factors = ordered["task"].to_list()
        self.source.data = {
            "task": ordered["task"].to_list(),
            "p50": ordered["p50"].to_list(),
            "p95": ordered["p95"].to_list(),
        }


class TrendChart:
    """A task's run durations over time, coloured by status."""

    def __init__(self) -> None:
        self.source = ColumnDataSource(
            {"at": [], "duration": [], "status": [], "color": [], "id": []}
        )
        fig = _figure("Duration trend, seconds (UTC)", x_axis_type="datetime")
        _time_axis(fig)
        fig.line(x="at", y="duration", source=self.source, color="#9aa5b1")
        fig.scatter(x="at", y="duration", source=self.source, color="color", size=7)
        fig.add_tools(
            HoverTool(
                tooltips=[("run", "#@id"), ("status", "@status"), ("duration", "@duration s")]
            )
        )
        self.pane = pn.pane.Bokeh(fig, sizing_mode="stretch_width", height=280)

    def update(self, trend: pl.DataFrame) -> None:
        statuses = trend["status"].to_list()
        self.source.data = {
            "at": epoch_ms(trend["finished_at"]),
            "duration": trend["duration"].to_list(),
            "status": statuses,
            "color": [STATUS_COLORS.get(s, "#9aa5b1") for s in statuses],
            "id": trend["id"].to_list(),
        }
