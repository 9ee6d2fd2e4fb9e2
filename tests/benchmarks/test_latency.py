"""Trigger latency on an idle stack, and a cron herd of 1,000 tasks due on the same minute."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import redis
from dramatiq import Message

from service.config import Settings
from tests.benchmarks.bench_support import (
    median,
    percentile,
    raw_workers,
    running_stack,
    sql,
    wait_raw_done,
)
from tests.benchmarks.conftest import Recorder
from tests.benchmarks.raw_dramatiq import make_broker
from tests.support import REDIS_URL, Stack, clear_namespace

pytestmark = pytest.mark.bench
TRIGGERS = int(os.environ.get("NBCRON_BENCH_TRIGGERS", "1000"))
HERD = int(os.environ.get("NBCRON_BENCH_HERD", "1000"))


@pytest.fixture
def idle_stack(settings: Settings, admin_key: str, tmp_path: Path) -> Iterator[Stack]:
    with running_stack(settings, admin_key, tmp_path, workers=2) as stack:
        yield stack


def _wait_finished(conn: psycopg.Connection, run_id: int) -> tuple[float, float]:
    """Poll until the run finished; (queued → running, queued → succeeded) in ms."""
    while True:
        row = conn.execute(
            "SELECT status, extract(epoch FROM started_at - queued_at), "
            "extract(epoch FROM finished_at - queued_at) FROM runs WHERE id = %s",
            (run_id,),
        ).fetchone()
        assert row is not None
        if row[0] not in ("queued", "running"):
            assert row[0] == "succeeded", row
            return float(row[1]) * 1000, float(row[2]) * 1000
        time.sleep(0.001)


def _raw_latency(settings: Settings, n: int) -> float:
    """Median ms from enqueue to actor start for bare Dramatiq with the same consumer wait."""
    namespace = f"{settings.broker_namespace}-rawlat"
    broker = make_broker(namespace)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        with raw_workers(
            namespace,
            processes=2,
            threads=settings.worker_threads,
            wait_ms=settings.consumer_wait_ms,
        ):
            for i in range(n):
                broker.enqueue(
                    Message(
                        queue_name="default",
                        actor_name="noop",
                        args=(time.time(),),
                        kwargs={},
                        options={},
                    )
                )
                wait_raw_done(namespace, i + 1, timeout=30)
        values = [float(v) * 1000 for v in client.lrange(f"{namespace}:latency", 0, -1)]
        return median(values)
    finally:
        broker.close()
        clear_namespace(namespace)


def test_trigger_latency_on_an_idle_stack(idle_stack: Stack, record: Recorder) -> None:
    api = idle_stack.client()
    assert (
        api.post(
            "/api/tasks", json={"name": "ping", "executor": "shell", "command": "true"}
        ).status_code
        == 201
    )
    to_running: list[float] = []
    to_done: list[float] = []
    with psycopg.connect(idle_stack.settings.database_url or "", autocommit=True) as conn:
        for _ in range(TRIGGERS):
            run = api.post("/api/tasks/ping/trigger").json()
            running, done = _wait_finished(conn, run["id"])
            to_running.append(running)
            to_done.append(done)
    raw = _raw_latency(idle_stack.settings, 200)
    record.add(
        f"trigger -> running p50 ({TRIGGERS} sequential)",
        median(to_running),
        "ms",
        baseline_name="raw Dramatiq enqueue -> start p50",
        baseline=raw,
        target="<= 20 ms",
    )
    record.add("trigger -> running p99", percentile(to_running, 99), "ms", target="<= 100 ms")
    record.add("trigger -> succeeded p50 (`true`)", median(to_done), "ms", target="<= 50 ms")


def test_cron_herd_of_a_thousand_tasks(idle_stack: Stack, record: Recorder) -> None:
    url = idle_stack.settings.database_url or ""
    sql(
        url,
        "INSERT INTO tasks (name, executor, spec, schedule, next_fire_at) "
        'SELECT \'herd-\' || g, \'shell\', \'{"command": "true", "shell": "/bin/sh"}\', '
        "'* * * * *', date_trunc('minute', now()) + interval '1 minute' "
        "FROM generate_series(1, %s) g",
        HERD,
    )
    slot = sql(url, "SELECT min(next_fire_at) FROM tasks")[0][0]
    wait = (slot - datetime.now(UTC)).total_seconds()
    time.sleep(max(0.0, wait))
    deadline = time.monotonic() + 120
    while (
        sql(
            url, "SELECT count(*) FROM runs WHERE scheduled_for = %s AND status = 'succeeded'", slot
        )[0][0]
        < HERD
    ):
        assert time.monotonic() < deadline, "herd did not finish"
        time.sleep(0.1)
    rows = sql(
        url,
        "SELECT task_id, extract(epoch FROM queued_at - scheduled_for), "
        "extract(epoch FROM started_at - scheduled_for) FROM runs "
        "WHERE scheduled_for = %s",
        slot,
    )
    assert len(rows) == HERD and len({r[0] for r in rows}) == HERD  # each exactly once
    lag = [float(r[1]) for r in rows]
    start = [float(r[2]) for r in rows]
    record.add(f"cron herd: last of {HERD} started after slot", max(start), "s", target="<= 3 s")
    record.add("cron herd: fire lag p99", percentile(lag, 99), "s", target="<= 1 s")
