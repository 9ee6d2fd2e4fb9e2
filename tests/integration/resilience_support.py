"""Helpers for the resilience tests: direct database reads, run chains, stacks with own settings."""

from __future__ import annotations

import itertools
import statistics
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.rows import dict_row

from service.config import Settings
from tests.support import TERMINAL, Stack, wait_for

Row = dict[str, Any]


def query(url: str, sql: str, params: dict[str, Any] | tuple[Any, ...] = ()) -> list[Row]:
    """Rows of one statement, on a short-lived autocommit connection."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=5) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def all_runs(url: str) -> list[Row]:
    return query(
        url, "SELECT r.*, t.name AS task_name FROM runs r JOIN tasks t ON t.id = r.task_id"
    )


def active_count(url: str) -> int:
    rows = query(url, "SELECT count(*) AS n FROM runs WHERE status IN ('queued', 'running')")
    return int(rows[0]["n"])


def wait_quiet(url: str, *, timeout: float, what: str = "every run terminal") -> None:
    """Wait until no run is queued or running."""
    wait_for(lambda: active_count(url) == 0, timeout=timeout, interval=0.2, what=what)


def executed_ids(path: Path) -> list[int]:
    """Run ids the commands wrote to `path` (one line per execution)."""
    if not path.exists():
        return []
    return [int(line) for line in path.read_text().split() if line.strip()]


def assert_each_once(path: Path, expected: set[int]) -> None:
    """Every expected run id was executed, each exactly once, and nothing else ran."""
    counts = Counter(executed_ids(path))
    twice = sorted(i for i, n in counts.items() if n > 1)
    assert not twice, f"run ids executed more than once: {twice}"
    assert set(counts) == expected, (
        f"never executed: {sorted(expected - set(counts))}; "
        f"executed but not expected: {sorted(set(counts) - expected)}"
    )


def task_body(name: str, command: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "executor": "shell", "command": command, **extra}


def create_task(api: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    resp = api.post("/api/tasks", json=body)
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def trigger(api: httpx.Client, ref: str) -> int:
    resp = api.post(f"/api/tasks/{ref}/trigger")
    assert resp.status_code == 202, resp.text
    return int(resp.json()["id"])


def record_command(path: Path, *, then: str = "") -> str:
    """A shell command appending its run id to `path` (O_APPEND writes of one line are atomic)."""
    command = f'echo "$NBCRON_RUN_ID" >> {path}'
    return f"{command}; {then}" if then else command


def chains(runs: list[Row]) -> dict[int, list[Row]]:
    """Runs grouped by their first attempt (following retry_of), each chain ordered by attempt."""
    by_id = {r["id"]: r for r in runs}

    def root(run: Row) -> int:
        while run["retry_of"] is not None:
            run = by_id[run["retry_of"]]
        return int(run["id"])

    grouped: dict[int, list[Row]] = {}
    for run in runs:
        grouped.setdefault(root(run), []).append(run)
    return {k: sorted(v, key=lambda r: r["attempt"]) for k, v in grouped.items()}


def check_chain(chain: list[Row], *, max_retries: int) -> None:
    """A finished chain: attempts 1..n linked by retry_of, no overlap, ends succeeded or exhausted."""
    first = chain[0]
    assert first["attempt"] == 1 and first["retry_of"] is None, chain
    for prev, nxt in itertools.pairwise(chain):
        assert prev["status"] in ("failed", "timed_out"), chain
        assert nxt["attempt"] == prev["attempt"] + 1, chain
        assert nxt["retry_of"] == prev["id"] and nxt["trigger"] == "retry", chain
        assert nxt["task_id"] == first["task_id"], chain
        assert nxt["started_at"] is not None and prev["finished_at"] is not None, chain
        assert nxt["started_at"] >= prev["finished_at"], f"attempts overlap: {chain}"
    for run in chain:
        assert run["status"] in TERMINAL, f"run {run['id']} is still {run['status']}"
        if run["started_at"] is not None:
            assert run["finished_at"] is not None and run["finished_at"] >= run["started_at"]
    last = chain[-1]
    if last["status"] != "succeeded":
        assert last["attempt"] == max_retries + 1, f"a retry is missing after {last}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"n={len(ms)} p50={statistics.median(ms):.1f} ms p90={percentile(ms, 0.9):.1f} ms "
        f"max={max(ms):.1f} ms all={[round(v) for v in ms]}"
    )


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


@contextmanager
def own_stack(settings: Settings, key: str, logs: Path) -> Iterator[Stack]:
    """A Stack on test-specific settings; on failure print every process's log tail."""
    logs.mkdir(parents=True, exist_ok=True)
    stack = Stack(settings=settings, key=key, logs=logs)
    try:
        yield stack
    except BaseException:
        dump_logs(logs)
        raise
    finally:
        stack.stop_all()


def shell_only(settings: Settings, **changes: Any) -> Settings:
    """Test settings for stacks that run only shell tasks: no warm notebook kernels per worker."""
    names = {f.name for f in fields(Settings)}
    if "kernel_pool_size" in names:
        changes.setdefault("kernel_pool_size", 0)
    return replace(settings, **changes)


def dump_logs(logs: Path, lines: int = 40) -> None:
    for path in sorted(logs.glob("*.log")):
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        print(f"----- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))


def start_worker(stack: Stack, name: str, *args: str, threads: int | None = None) -> None:
    """A worker process labelled and registered as `name`."""
    extra = {"NBCRON_WORKER_NAME": name}
    if threads is not None:
        extra["NBCRON_WORKER_THREADS"] = str(threads)
    stack.start("worker", *args, name=name, **extra)


def wait_worker_alive(url: str, name: str, *, timeout: float = 30) -> None:
    def alive() -> bool:
        rows = query(url, "SELECT 1 FROM workers WHERE name = %s AND stopped_at IS NULL", (name,))
        return bool(rows)

    wait_for(alive, timeout=timeout, what=f"worker {name} to register")


def wait_dispatchers(url: str, count: int, *, since: datetime, timeout: float = 30) -> None:
    def beating() -> bool:
        rows = query(
            url, "SELECT count(*) AS n FROM dispatchers WHERE last_heartbeat >= %s", (since,)
        )
        return int(rows[0]["n"]) >= count

    wait_for(beating, timeout=timeout, what=f"{count} dispatcher(s) to heartbeat")
