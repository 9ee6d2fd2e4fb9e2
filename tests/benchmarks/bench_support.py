"""Shared pieces of the benchmarks: bulk SQL, process RSS, percentiles, raw Dramatiq workers."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis

from service.config import Settings
from tests.support import REDIS_URL, ROOT, Stack, wait_for


def sql(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values)


def rss_mb(proc: subprocess.Popen[bytes]) -> float:
    return psutil.Process(proc.pid).memory_info().rss / 2**20


def wait_workers(stack: Stack, count: int) -> None:
    url = stack.settings.database_url or ""
    wait_for(
        lambda: sql(url, "SELECT count(*) FROM workers WHERE stopped_at IS NULL")[0][0] >= count,
        timeout=60,
        what=f"{count} workers",
    )


@contextmanager
def raw_workers(namespace: str, *, processes: int, threads: int, wait_ms: int) -> Iterator[None]:
    """Bare Dramatiq worker processes (the baseline), ready when the block starts."""
    cmd = [
        sys.executable,
        "-m",
        "tests.benchmarks.raw_dramatiq",
        namespace,
        str(threads),
        str(wait_ms),
    ]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(processes)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def raw_done(namespace: str) -> int:
    return int(redis.Redis.from_url(REDIS_URL).get(f"{namespace}:done") or 0)


def wait_raw_done(namespace: str, n: int, timeout: float) -> float:
    """Seconds until `n` baseline messages were processed."""
    start = time.perf_counter()
    while raw_done(namespace) < n:
        if time.perf_counter() - start > timeout:
            raise AssertionError(f"baseline stuck at {raw_done(namespace)}/{n}")
        time.sleep(0.02)
    return time.perf_counter() - start


def tuned(settings: Settings) -> Settings:
    """Benchmark knobs from the environment (NBCRON_BENCH_WAIT_MS, NBCRON_BENCH_THREADS)."""
    wait = os.environ.get("NBCRON_BENCH_WAIT_MS")
    threads = os.environ.get("NBCRON_BENCH_THREADS")
    return settings.with_overrides(
        consumer_wait_ms=int(wait) if wait else None,
        worker_threads=int(threads) if threads else None,
    )


@contextmanager
def running_stack(settings: Settings, key: str, logs: Path, *, workers: int) -> Iterator[Stack]:
    """API, dispatcher and `workers` worker processes, up and registered."""
    stack = Stack(settings=tuned(settings), key=key, logs=logs)
    stack.start("api")
    stack.start("dispatcher")
    for i in range(workers):
        stack.start("worker", name=f"worker{i}")
    try:
        stack.wait_healthy()
        wait_workers(stack, workers)
        yield stack
    finally:
        stack.stop_all()
