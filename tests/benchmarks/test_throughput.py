"""Drain throughput (20,000 shell `true` runs through the whole path) and process memory."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dramatiq import Message

from service.config import Settings
from tests.benchmarks.bench_support import (
    raw_workers,
    rss_mb,
    running_stack,
    sql,
    wait_raw_done,
)
from tests.benchmarks.conftest import Recorder
from tests.benchmarks.raw_dramatiq import make_broker
from tests.support import Stack, clear_namespace

pytestmark = pytest.mark.bench
N = int(os.environ.get("NBCRON_BENCH_DRAIN", "20000"))
WORKERS = 2


@pytest.fixture
def drain_stack(settings: Settings, admin_key: str, tmp_path: Path) -> Iterator[Stack]:
    with running_stack(settings, admin_key, tmp_path, workers=WORKERS) as stack:
        yield stack


def _raw_baseline(settings: Settings) -> float:
    """Runs/minute of bare Dramatiq draining N no-op messages with the same processes/threads."""
    namespace = f"{settings.broker_namespace}-raw"
    broker = make_broker(namespace)
    try:
        with raw_workers(
            namespace,
            processes=WORKERS,
            threads=settings.worker_threads,
            wait_ms=settings.consumer_wait_ms,
        ):
            start = time.perf_counter()
            for _ in range(N):
                broker.enqueue(
                    Message(
                        queue_name="default", actor_name="noop", args=(0.0,), kwargs={}, options={}
                    )
                )
            wait_raw_done(namespace, N, timeout=600)
            return N / (time.perf_counter() - start) * 60
    finally:
        broker.close()
        clear_namespace(namespace)


def _subprocess_baseline(n: int = 2000) -> float:
    start = time.perf_counter()
    for _ in range(n):
        subprocess.run(["true"], check=True)
    return n / (time.perf_counter() - start) * 60


def test_drain_throughput_and_memory(drain_stack: Stack, record: Recorder) -> None:
    url = drain_stack.settings.database_url or ""
    resp = drain_stack.client().post(
        "/api/tasks", json={"name": "noop", "executor": "shell", "command": "true"}
    )
    assert resp.status_code == 201, resp.text
    task = resp.json()
    idle = {label: rss_mb(p) for label, p in drain_stack.procs.items()}

    start = time.perf_counter()
    sql(
        url,
        "INSERT INTO runs (task_id, trigger, queue) "
        "SELECT %s, 'manual', 'default' FROM generate_series(1, %s)",
        task["id"],
        N,
    )
    while sql(url, "SELECT count(*) FROM runs WHERE status = 'succeeded'")[0][0] < N:
        assert time.perf_counter() - start < 600, "drain did not finish in 10 minutes"
        time.sleep(0.1)
    elapsed = time.perf_counter() - start
    statuses = dict(sql(url, "SELECT status, count(*) FROM runs GROUP BY status"))
    assert statuses == {"succeeded": N}, statuses
    after = {label: rss_mb(p) for label, p in drain_stack.procs.items()}

    rate = N / elapsed * 60
    raw = _raw_baseline(dataclasses.replace(drain_stack.settings))
    bare = _subprocess_baseline()
    slower = min(raw, bare)
    record.add(
        f"drain {N:,} shell runs, {WORKERS} workers",
        rate,
        "runs/min",
        baseline_name="raw Dramatiq no-op",
        baseline=raw,
        target=">= 30,000/min",
    )
    record.add(
        "drain vs bare subprocess.run(['true']) loop",
        rate,
        "runs/min",
        baseline_name="subprocess loop",
        baseline=bare,
        target=">= 0.6 x slower baseline",
    )
    record.add("drain / slower baseline", rate / slower, "x", target=">= 0.6")
    for label in ("api", "dispatcher", "worker0"):
        record.add(f"RSS {label} idle", idle[label], "MB", target="<= 200 MB")
        record.add(f"RSS {label} after drain", after[label], "MB", target="<= 200 MB")
