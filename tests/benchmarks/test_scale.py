"""Scale: 100,000 tasks and 5,000,000 runs of history; list and detail endpoints stay fast, and
the dispatcher's tick does not grow with tasks that are not due."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from service.auth import ensure_admin_key
from service.broker import make_broker
from service.config import Settings
from service.dispatcher import Dispatcher
from service.store import Store
from tests.benchmarks.bench_support import percentile
from tests.benchmarks.conftest import Recorder
from tests.support import PG_URL, Stack, fresh_database, template_name

pytestmark = pytest.mark.bench
TASKS = int(os.environ.get("NBCRON_BENCH_TASKS", "100000"))
RUNS = int(os.environ.get("NBCRON_BENCH_RUNS", "5000000"))
SAMPLES = 200


def _build(url: str, tasks: int, runs: int) -> None:
    """Tasks (scheduled daily, not due) and runs spread over them, newest last."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tasks (name, executor, spec, schedule, next_fire_at, tags) "
            "SELECT 'task-' || g, 'shell', '{\"command\": \"true\"}', '0 3 * * *', "
            "now() + interval '1 day', ARRAY['t' || (g %% 50)] FROM generate_series(1, %s) g",
            (tasks,),
        )
        # synthetic history: skip the per-row metric/notification triggers (minutes at 5M rows)
        conn.execute("ALTER TABLE runs DISABLE TRIGGER USER")
        conn.execute(
            "INSERT INTO runs (task_id, status, trigger, queued_at, started_at, finished_at, "
            "exit_code, queue) "
            "SELECT 1 + (g %% %s), (ARRAY['succeeded','failed','succeeded','succeeded'])[1 + g %% 4],"
            " 'schedule', now() - make_interval(secs => %s - g), "
            "now() - make_interval(secs => %s - g), now() - make_interval(secs => %s - g) "
            "+ interval '2 seconds', 0, 'default' FROM generate_series(1, %s) g",
            (tasks, runs, runs, runs, runs),
        )
        conn.execute("ALTER TABLE runs ENABLE TRIGGER USER")
        conn.execute("ANALYZE")


@pytest.fixture(scope="module")
def scale_template() -> str:
    """A database with the big history, built once and kept as a template between runs."""
    name = f"{template_name()}_scale_{TASKS}_{RUNS}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return name
    with fresh_database(template_name()) as url:
        _build(url, TASKS, RUNS)
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{url.rsplit("/", 1)[1]}" RENAME TO "{name}"')
    return name


@pytest.fixture
def big(scale_template: str, settings: Settings, tmp_path: Path) -> Iterator[Stack]:
    with fresh_database(scale_template) as url:
        local = settings.with_overrides(database_url=url)
        with Store(url) as store:
            ensure_admin_key(store, local.admin_key_path)
        stack = Stack(settings=local, key=local.admin_key_path.read_text().strip(), logs=tmp_path)
        stack.start("api")
        try:
            stack.wait_healthy()
            yield stack
        finally:
            stack.stop_all()


def _p99(client: httpx.Client, paths: list[str]) -> float:
    for path in paths[:10]:
        client.get(path)
    times = []
    for i in range(SAMPLES):
        start = time.perf_counter()
        resp = client.get(paths[i % len(paths)])
        times.append((time.perf_counter() - start) * 1000)
        assert resp.status_code == 200, resp.text
    return percentile(times, 99)


def test_endpoints_stay_fast_on_a_big_history(big: Stack, record: Recorder) -> None:
    with big.client() as api:
        deep = api.get("/api/runs", params={"limit": 50, "cursor": RUNS // 3}).json()
        assert len(deep["items"]) == 50
        ids = [f"/api/tasks/{i}" for i in range(1, TASKS, TASKS // 50)]
        checks = {
            "GET /api/tasks?limit=50 (pages)": [
                f"/api/tasks?limit=50&cursor={c}" for c in range(1, TASKS, TASKS // 40)
            ],
            "GET /api/tasks/{id}": ids,
            "GET /api/runs?limit=50 (pages)": [
                f"/api/runs?limit=50&cursor={c}" for c in range(RUNS, 0, -(RUNS // 40))
            ],
            "GET /api/runs?task=ID&status=failed": [
                f"/api/runs?task={i}&status=failed&limit=50" for i in range(1, TASKS, TASKS // 40)
            ],
            "GET /api/tasks/{id}/runs": [f"{p}/runs?limit=50" for p in ids],
            "GET /api/runs/{id}": [f"/api/runs/{i}" for i in range(1, RUNS, RUNS // 50)],
        }
        for label, paths in checks.items():
            record.add(
                f"{label} p99, {TASKS:,} tasks / {RUNS:,} runs",
                _p99(api, paths),
                "ms",
                target="<= 50 ms",
            )


def _tick_ms(url: str, settings: Settings) -> float:
    with Store(url) as store:
        broker = make_broker(settings)
        dispatcher = Dispatcher(store, broker, settings)
        dispatcher.tick()
        start = time.perf_counter()
        for _ in range(50):
            dispatcher.tick()
        broker.close()
        return (time.perf_counter() - start) / 50 * 1000


def test_dispatcher_tick_does_not_grow_with_tasks_not_due(
    big: Stack, template_db: str, settings: Settings, record: Recorder
) -> None:
    large = _tick_ms(big.settings.database_url or "", settings)
    with fresh_database(template_db) as small_url:
        with psycopg.connect(small_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO tasks (name, executor, spec, schedule, next_fire_at) "
                "SELECT 'task-' || g, 'shell', '{\"command\": \"true\"}', '0 3 * * *', "
                "now() + interval '1 day' FROM generate_series(1, 1000) g"
            )
        small = _tick_ms(small_url, settings)
    record.add(
        f"dispatcher tick, {TASKS:,} tasks not due",
        large,
        "ms",
        baseline_name="1,000 tasks not due",
        baseline=small,
        target="ratio ~ 1",
    )
