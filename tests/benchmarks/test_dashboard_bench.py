"""The dashboard overview with 1,000,000 runs in history must render in under 2 s.

The history is generated in Postgres (`INSERT … SELECT generate_series`) in a fresh test database:
50 tasks, runs spread over 30 days, a realistic mix of statuses. We time
- the overview's data (`dashboards.data.overview`: SQL aggregates over the 24-hour window),
- a full server-side render (`OverviewView.refresh()` plus building the Bokeh models),
- the same with a 7-day window and with a tag filter,
against a baseline that reads the whole runs table into Polars and aggregates there.
Run with `make bench`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import psycopg
import pytest
from bokeh.document import Document

from dashboards import data
from dashboards.data import Filters
from dashboards.views import OverviewView
from service.config import Settings
from service.store import Store

RUNS = 1_000_000
TASKS = 50
DAYS = 30
BUDGET_SECONDS = 2.0

TASKS_SQL = """
INSERT INTO tasks (name, executor, spec, tags, schedule, next_fire_at)
SELECT format('task-%%s', lpad(g::text, 3, '0')), 'shell', '{"command": "true"}',
       ARRAY[(ARRAY['etl', 'web', 'ml'])[1 + g %% 3]],
       CASE WHEN g %% 5 = 0 THEN '*/15 * * * *' END, NULL
FROM generate_series(1, %(tasks)s) g
"""
RUNS_SQL = """
INSERT INTO runs (task_id, status, trigger, queued_at, started_at, finished_at, exit_code, worker)
SELECT t.first_id + g %% %(tasks)s,
       s.status, 'schedule', q.at, q.at + interval '1 second',
       q.at + interval '1 second' + (g %% 97) * interval '1 second' * (1 + g %% %(tasks)s) / 10,
       CASE WHEN s.status = 'succeeded' THEN 0 ELSE 1 END, 'bench-worker'
FROM generate_series(1, %(runs)s) g
CROSS JOIN (SELECT min(id) AS first_id FROM tasks) t
CROSS JOIN LATERAL (SELECT now() - g * (%(days)s * interval '1 day') / %(runs)s AS at) q
CROSS JOIN LATERAL (SELECT CASE WHEN g %% 100 < 80 THEN 'succeeded'
                               WHEN g %% 100 < 90 THEN 'failed'
                               WHEN g %% 100 < 94 THEN 'timed_out'
                               WHEN g %% 100 < 97 THEN 'cancelled'
                               ELSE 'missed' END AS status) s
"""
LIVE_SQL = """
INSERT INTO runs (task_id, status, trigger, started_at, worker)
SELECT min(id), 'running', 'manual', now(), 'bench-worker' FROM tasks, generate_series(1, 20)
GROUP BY generate_series;
INSERT INTO runs (task_id, trigger) SELECT min(id), 'manual' FROM tasks, generate_series(1, 100)
GROUP BY generate_series;
"""
NAIVE_SQL = """
SELECT r.id, r.status, r.queued_at, r.started_at, r.finished_at, t.name AS task
FROM runs r JOIN tasks t ON t.id = r.task_id
"""


def _fill(url: str) -> float:
    """Generate the history; seconds it took."""
    start = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        # Synthetic history: skip row triggers (run metrics, notifications) and FK checks,
        # which would cost minutes for a million rows and matter nothing to the dashboard.
        conn.execute("SET session_replication_role = replica")
        conn.execute(TASKS_SQL, {"tasks": TASKS})
        conn.execute(RUNS_SQL, {"tasks": TASKS, "runs": RUNS, "days": DAYS})
        conn.execute(LIVE_SQL)
        conn.execute("VACUUM ANALYZE runs")
        count = conn.execute("SELECT count(*) FROM runs").fetchone()
    assert count is not None and count[0] >= RUNS
    return time.perf_counter() - start


def _naive_overview(url: str, hours: int) -> pl.DataFrame:
    """The baseline: read every run into Polars, then aggregate the window there."""
    with psycopg.connect(url) as conn:
        cur = conn.execute(NAIVE_SQL)
        names = [c.name for c in cur.description or []]
        runs = pl.DataFrame(cur.fetchall(), schema=names, orient="row")
    since = datetime.now(UTC) - timedelta(hours=hours)
    window = runs.filter(pl.col("queued_at").dt.convert_time_zone("UTC") >= since)
    window.group_by(pl.col("queued_at").dt.truncate("1h"), "status").len()
    duration = (pl.col("finished_at") - pl.col("started_at")).dt.total_milliseconds() / 1000
    return window.group_by("task").agg(
        duration.quantile(0.5).alias("p50"), duration.quantile(0.95).alias("p95")
    )


def _timed(fn: Callable[[], Any], *, repeat: int = 5) -> float:
    """Median wall time of `fn` in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _render(store: Store, filters: Filters) -> None:
    """A full server-side render of the overview: data, HTML, charts, Bokeh models."""
    view = OverviewView(store, filters=filters)
    view.refresh()
    view.layout.get_root(Document())


@pytest.mark.bench
def test_overview_with_a_million_runs_renders_under_two_seconds(
    store: Store, settings: Settings, record: Any
) -> None:
    url = settings.database_url
    assert url
    fill_seconds = _fill(url)
    rows: list[tuple[str, float]] = [
        ("overview data, 24 h window", _timed(lambda: data.overview(store, Filters()))),
        ("overview render, 24 h window", _timed(lambda: _render(store, Filters()))),
        ("overview render, 7 day window", _timed(lambda: _render(store, Filters(hours=168)))),
        ("overview render, tag=etl, 24 h", _timed(lambda: _render(store, Filters(tag="etl")))),
    ]
    naive = _timed(lambda: _naive_overview(url, 24), repeat=1)
    _print_table(rows, naive, fill_seconds)
    for label, ms in rows[:2]:  # into the suite's summary table (tests/benchmarks/conftest.py)
        record.add(
            f"dashboard {label}, 1M runs",
            ms,
            "ms",
            baseline_name="full read into Polars",
            baseline=naive,
            target=f"< {BUDGET_SECONDS * 1000:.0f} ms",
            higher_is_better=False,
        )
    view = data.overview(store, Filters())
    assert view.total > 0 and view.durations.height == 20 and view.running.height == 20
    # The budget is for the overview as it opens (24-hour window), filtered or not; the 7-day
    # window is printed for information (it aggregates ~7x more rows).
    for label, ms in rows:
        if "7 day" not in label:
            assert ms < BUDGET_SECONDS * 1000, f"{label}: {ms:.0f} ms"


def _print_table(rows: list[tuple[str, float]], naive: float, fill_seconds: float) -> None:
    print(
        f"\ndashboard overview, {RUNS:,} runs over {DAYS} days ({fill_seconds:.0f} s to generate)"
    )
    print(f"| {'measure':<32} | {'median ms':>9} | {'baseline ms':>11} | {'speed-up':>8} |")
    print(f"|{'-' * 34}|{'-' * 11}|{'-' * 13}|{'-' * 10}|")
    for label, ms in rows:
        print(f"| {label:<32} | {ms:>9.0f} | {naive:>11.0f} | {naive / ms:>7.1f}x |")
    print(f"| {'baseline: full read into Polars':<32} | {naive:>9.0f} | {'':>11} | {'':>8} |")
    print(f"budget: < {BUDGET_SECONDS * 1000:.0f} ms for the overview (24 h window, any filter)")
