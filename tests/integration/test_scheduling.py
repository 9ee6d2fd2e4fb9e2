"""Scheduling semantics on the real database and broker: misfire, overlap, pause, dependencies,
retries, time limits and cancellation."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest

from executors.shell import marked_processes
from service.broker import make_broker
from service.config import Settings
from service.dispatcher import Dispatcher, run_loop
from service.store import Store
from tests.support import Stack, wait_for, wait_run


@pytest.fixture
def dispatcher(store: Store, settings: Settings) -> Iterator[Dispatcher]:
    """An in-process dispatcher on the real broker (no worker: dispatched runs stay queued)."""
    broker = make_broker(settings)
    yield Dispatcher(store, broker, settings)
    broker.close()


def sql(settings: Settings, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def make_task(stack: Stack, **body: Any) -> dict[str, Any]:
    with stack.client() as api:
        resp = api.post("/api/tasks", json={"executor": "shell", "command": "true", **body})
    assert resp.status_code == 201, resp.text
    return resp.json()


def runs_of(settings: Settings, task_id: int) -> list[dict[str, Any]]:
    rows = sql(
        settings,
        "SELECT id, status, trigger, attempt, retry_of, scheduled_for, reason, "
        "not_before, started_at, finished_at FROM runs WHERE task_id = %s ORDER BY id",
        task_id,
    )
    keys = (
        "id",
        "status",
        "trigger",
        "attempt",
        "retry_of",
        "scheduled_for",
        "reason",
        "not_before",
        "started_at",
        "finished_at",
    )
    return [dict(zip(keys, r, strict=True)) for r in rows]


def back_date(settings: Settings, task_id: int, *, minutes: int) -> None:
    """Pretend no dispatcher ran for `minutes`: the pending slot is that far in the past."""
    sql(
        settings,
        "UPDATE tasks SET next_fire_at = date_trunc('minute', now()) "
        "- make_interval(mins => %s) WHERE id = %s",
        minutes,
        task_id,
    )


def test_a_slot_due_by_the_database_clock_but_not_yet_by_the_dispatchers_waits_a_tick(
    store: Store, settings: Settings
) -> None:
    """The dispatcher's clock a little behind Postgres's at a slot boundary: the slot is not due
    yet for the tick, which must end (not spin on a task it cannot advance) and fire it later."""
    from service.firing import fire_due_tasks

    sql(
        settings,
        "INSERT INTO tasks (name, executor, spec, schedule, next_fire_at) "
        "SELECT 'edge-' || g, 'shell', '{\"command\": \"true\"}', '* * * * *', "
        "date_trunc('minute', now()) FROM generate_series(1, 150) g",
    )
    slot = sql(settings, "SELECT min(next_fire_at) FROM tasks")[0][0]
    started = time.monotonic()
    assert fire_due_tasks(store, now=slot - timedelta(milliseconds=5)) == 0
    assert time.monotonic() - started < 5
    assert sql(settings, "SELECT count(*) FROM runs") == [(0,)]
    assert fire_due_tasks(store, now=slot + timedelta(milliseconds=5)) == 150
    assert sql(settings, "SELECT count(DISTINCT task_id), min(scheduled_for) FROM runs") == [
        (150, slot)
    ]


def test_a_task_written_while_the_dispatcher_sleeps_is_fired_at_once(
    dispatcher: Dispatcher, settings: Settings
) -> None:
    """A task write wakes the sleeping dispatcher (NOTIFY, migration 0006), which looks at the
    schedule at once instead of after its poll (here 30 s; each wait is at most 1 s)."""
    dispatcher.settings = settings.with_overrides(poll_interval_seconds=30.0)
    stop = threading.Event()
    loop = threading.Thread(target=run_loop, args=(dispatcher, stop), daemon=True)
    loop.start()
    lags = []
    try:
        time.sleep(0.5)  # the dispatcher is asleep: nothing is due
        for i in range(5):
            # a slot already come (this minute's), so the task is due the moment it is written
            written = sql(
                settings,
                "INSERT INTO tasks (name, executor, spec, schedule, misfire_policy, "
                "next_fire_at) VALUES (%s, 'shell', '{\"command\": \"true\"}', '* * * * *', "
                "'run_once', date_trunc('minute', now())) RETURNING id, clock_timestamp()",
                f"written-{i}",
            )[0]

            def queued(task_id: int = written[0]) -> list[tuple[Any, ...]]:
                return sql(settings, "SELECT queued_at FROM runs WHERE task_id = %s", task_id)

            wait_for(lambda q=queued: bool(q()), timeout=5, what=f"written-{i} fired")
            lags.append((queued()[0][0] - written[1]).total_seconds())
            time.sleep(0.3)
    finally:
        stop.set()
        loop.join(10)
    assert max(lags) < 0.5, lags  # by the 1 s wait alone, five in a row would rarely be


@pytest.mark.parametrize(
    ("policy", "expect_runs"),
    [("skip", (0, 1)), ("run_once", (1, 1)), ("run_all", (10, 11))],
)
def test_two_hours_without_a_dispatcher_follow_the_misfire_policy(
    api_stack: Stack, dispatcher: Dispatcher, policy: str, expect_runs: tuple[int, int]
) -> None:
    task = make_task(
        api_stack,
        name=f"every-minute-{policy}",
        schedule="* * * * *",
        misfire_policy=policy,
        max_catchup=10,
        misfire_grace_seconds=30,
    )
    back_date(api_stack.settings, task["id"], minutes=120)
    dispatcher.tick()
    runs = runs_of(api_stack.settings, task["id"])
    counts = Counter(r["status"] for r in runs)
    queued = counts["queued"]
    assert expect_runs[0] <= queued <= expect_runs[1], counts
    assert counts["missed"] + queued in (120, 121)  # every slot is accounted for, once
    assert all(r["reason"] for r in runs if r["status"] == "missed")
    slots = [r["scheduled_for"] for r in runs]
    assert len(slots) == len(set(slots))
    next_fire = sql(
        api_stack.settings, "SELECT next_fire_at > now() FROM tasks WHERE id = %s", task["id"]
    )
    assert next_fire == [(True,)]
    dispatcher.tick()  # a second tick adds nothing
    assert len(runs_of(api_stack.settings, task["id"])) == len(runs)


def test_a_paused_task_never_fires_and_resuming_follows_the_misfire_policy(
    api_stack: Stack, dispatcher: Dispatcher
) -> None:
    task = make_task(api_stack, name="pausable", schedule="* * * * *", misfire_policy="run_once")
    with api_stack.client() as api:
        assert api.patch("/api/tasks/pausable", json={"enabled": False}).status_code == 200
    back_date(api_stack.settings, task["id"], minutes=30)
    dispatcher.tick()
    assert runs_of(api_stack.settings, task["id"]) == []
    with api_stack.client() as api:
        assert api.patch("/api/tasks/pausable", json={"enabled": True}).json()["enabled"]
    dispatcher.tick()
    counts = Counter(r["status"] for r in runs_of(api_stack.settings, task["id"]))
    assert counts["queued"] == 1
    assert counts["missed"] in (29, 30)


def test_overlap_forbid_records_the_slot_as_missed(
    api_stack: Stack, dispatcher: Dispatcher
) -> None:
    task = make_task(api_stack, name="no-overlap", schedule="* * * * *", overlap_policy="forbid")
    with api_stack.client() as api:
        active = api.post("/api/tasks/no-overlap/trigger").json()  # stays queued: no worker
    back_date(api_stack.settings, task["id"], minutes=1)
    dispatcher.tick()
    runs = runs_of(api_stack.settings, task["id"])
    assert [r["id"] for r in runs if r["status"] == "queued"] == [active["id"]]
    reasons = [r["reason"] for r in runs if r["status"] == "missed"]
    # the slot that would run is refused for overlap; older ones were coalesced by run_once
    assert sum("overlap" in r for r in reasons) == 1, reasons
    assert all("overlap" in r or "coalesced" in r for r in reasons), reasons


def test_overlap_replace_kills_the_old_tree_before_the_new_run_starts(stack: Stack) -> None:
    task = make_task(
        stack,
        name="replacer",
        schedule="* * * * *",
        overlap_policy="replace",
        command="sleep 60 & sleep 60 & wait",
    )
    with stack.client() as api:
        old = api.post("/api/tasks/replacer/trigger").json()
        wait_for(
            lambda: api.get(f"/api/runs/{old['id']}").json()["status"] == "running",
            what="old run running",
        )
        back_date(stack.settings, task["id"], minutes=1)
        old_done = wait_run(api, old["id"], timeout=20)
        assert old_done["status"] == "cancelled"
        assert marked_processes(old["id"]) == []
        new = wait_for(
            lambda: [
                r
                for r in runs_of(stack.settings, task["id"])
                if r["trigger"] == "schedule" and r["started_at"]
            ],
            timeout=20,
            what="replacement started",
        )[0]
    assert new["started_at"] >= old_done_finished(stack.settings, old["id"])


def old_done_finished(settings: Settings, run_id: int) -> datetime:
    return sql(settings, "SELECT finished_at FROM runs WHERE id = %s", run_id)[0][0]


def test_dependencies_reject_cycles_and_unknown_upstreams(api_stack: Stack) -> None:
    make_task(api_stack, name="a")
    make_task(api_stack, name="b", depends_on=["a"])
    with api_stack.client() as api:
        unknown = api.post(
            "/api/tasks",
            json={"name": "c", "executor": "shell", "command": "true", "depends_on": ["ghost"]},
        )
        assert unknown.status_code == 422 and unknown.json()["field"] == "depends_on"
        cycle = api.patch("/api/tasks/a", json={"depends_on": ["b"]})
        assert cycle.status_code == 422 and "cycle" in cycle.json()["detail"]
        assert api.get("/api/tasks/a").json()["depends_on"] == []


def test_a_dependent_runs_once_after_all_upstreams_succeed(stack: Stack) -> None:
    make_task(stack, name="extract")
    make_task(stack, name="load")
    down = make_task(stack, name="report", depends_on=["extract", "load"])
    with stack.client() as api:
        wait_run(api, api.post("/api/tasks/extract/trigger").json()["id"])
        time.sleep(1.0)
        assert runs_of(stack.settings, down["id"]) == []  # load has not succeeded yet
        wait_run(api, api.post("/api/tasks/load/trigger").json()["id"])
        released = wait_for(lambda: runs_of(stack.settings, down["id"]), what="dependent run")
        assert len(released) == 1 and released[0]["trigger"] == "dependency"
        wait_run(api, released[0]["id"])
        # one more upstream success alone does not release it again
        wait_run(api, api.post("/api/tasks/extract/trigger").json()["id"])
        time.sleep(1.0)
    assert len(runs_of(stack.settings, down["id"])) == 1


def test_a_failed_upstream_records_the_dependent_as_missed(stack: Stack) -> None:
    make_task(stack, name="flaky", command="exit 1")
    down = make_task(stack, name="after-flaky", depends_on=["flaky"])
    with stack.client() as api:
        wait_run(api, api.post("/api/tasks/flaky/trigger").json()["id"])
    runs = wait_for(lambda: runs_of(stack.settings, down["id"]), what="missed dependent")
    assert [(r["status"], r["reason"]) for r in runs] == [("missed", "upstream failed: flaky")]


def test_retries_are_runs_of_their_own_with_exponential_backoff(stack: Stack) -> None:
    task = make_task(stack, name="retrying", command="exit 2", max_retries=2, retry_delay_seconds=1)
    with stack.client() as api:
        api.post("/api/tasks/retrying/trigger")
        runs = wait_for(
            lambda: (
                (r := runs_of(stack.settings, task["id"]))
                and len(r) == 3
                and all(x["finished_at"] for x in r)
                and r
            ),
            timeout=30,
            what="3 attempts",
        )
    assert [r["attempt"] for r in runs] == [1, 2, 3]
    assert [r["trigger"] for r in runs] == ["manual", "retry", "retry"]
    assert [r["retry_of"] for r in runs] == [None, runs[0]["id"], runs[1]["id"]]
    assert {r["status"] for r in runs} == {"failed"}
    delays = [(runs[i + 1]["not_before"] - runs[i]["finished_at"]).total_seconds() for i in (0, 1)]
    assert 0.85 <= delays[0] <= 1.15, delays  # base, ±10% jitter
    assert 1.75 <= delays[1] <= 2.25, delays  # doubled


def test_timeout_kills_the_whole_tree_and_the_worker_goes_on(stack: Stack) -> None:
    make_task(stack, name="hang", command="sleep 999 & sleep 999 & wait", timeout_seconds=2)
    with stack.client() as api:
        started = time.monotonic()
        run = wait_run(api, api.post("/api/tasks/hang/trigger").json()["id"], timeout=20)
        elapsed = time.monotonic() - started
        assert run["status"] == "timed_out", run
        assert elapsed < 2 + 6, elapsed
        assert marked_processes(run["id"]) == []
        make_task(stack, name="after")
        assert wait_run(api, api.post("/api/tasks/after/trigger").json()["id"])["status"] == (
            "succeeded"
        )


def test_cancel_a_running_run_within_five_seconds(stack: Stack) -> None:
    make_task(stack, name="long", command="sleep 300 & sleep 300; wait")
    with stack.client() as api:
        run = api.post("/api/tasks/long/trigger").json()
        wait_for(
            lambda: api.get(f"/api/runs/{run['id']}").json()["status"] == "running", what="running"
        )
        asked = time.monotonic()
        resp = api.post(f"/api/runs/{run['id']}/cancel")
        assert resp.status_code == 200 and resp.json()["cancel_requested"] is True
        done = wait_run(api, run["id"], timeout=10)
        assert time.monotonic() - asked < 5
    assert done["status"] == "cancelled"
    assert marked_processes(run["id"]) == []


def test_next_fire_times_are_shown_in_the_task_detail(api_stack: Stack) -> None:
    make_task(api_stack, name="paris", schedule="0 7 * * *", timezone="Europe/Paris")
    with api_stack.client() as api:
        times = api.get("/api/tasks/paris").json()["next_fire_times"]
    parsed = [datetime.fromisoformat(t) for t in times]
    assert len(parsed) == 5
    assert all(
        b - a == timedelta(days=1) or b - a in (timedelta(hours=23), timedelta(hours=25))
        for a, b in itertools.pairwise(parsed)
    )
