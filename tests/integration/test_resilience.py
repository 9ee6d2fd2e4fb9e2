"""Never lose, never double (issue 3): real dispatchers, workers, Postgres and brokers under faults.

Every test starts real role processes (`python -m service.cli api|dispatcher|worker`) and kills,
stops or flushes real servers; nothing is mocked. Commands append `$NBCRON_RUN_ID` to a file so
"executed exactly once" is checked on what really ran, not only on what the database says.
"""

from __future__ import annotations

import random
import signal
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import redis

from service.auth import ensure_admin_key
from service.broker import make_broker, send_run
from service.config import Settings
from service.embedded import EmbeddedPostgres, EmbeddedValkey, free_port
from service.migrate import migrate
from service.store import Store
from tests.integration.resilience_support import (
    all_runs,
    assert_each_once,
    chains,
    check_chain,
    create_task,
    executed_ids,
    own_stack,
    query,
    record_command,
    shell_only,
    start_worker,
    summary,
    task_body,
    trigger,
    utc,
    wait_dispatchers,
    wait_quiet,
    wait_worker_alive,
)
from tests.support import Stack, wait_for, wait_run

MINUTE = timedelta(minutes=1)


def _db(settings: Settings) -> str:
    assert settings.database_url
    return settings.database_url


# -- 1. several dispatchers ------------------------------------------------------------------

CRON_TASKS = 50
WAVES = 5
BACKLOG_MINUTES = 5  # next_fire_at moved this far back: 6 due slots per task (-5 … now)
DISPATCHERS = ("d1", "d2", "d3")


def test_three_dispatchers_fire_each_slot_once_and_every_run_executes_once(
    settings: Settings, admin_key: str, tmp_path: Path
) -> None:
    # A dispatcher killed between claiming and sending leaves runs marked sent: the stale-send
    # rule must pick them up within the test, so it is short here.
    s = shell_only(settings, redispatch_after_seconds=5.0, poll_interval_seconds=0.5)
    url, ran = _db(s), tmp_path / "ran.txt"
    names = [f"cron-{i:02d}" for i in range(CRON_TASKS)]
    rng = random.Random(3)
    starts: dict[str, datetime] = {}
    backdated_at: dict[str, datetime] = {}
    with own_stack(s, admin_key, tmp_path / "logs") as stack, stack.client() as api:
        stack.start("api")
        stack.wait_healthy()
        for name in names:
            body = task_body(
                name,
                record_command(ran),
                schedule="* * * * *",
                misfire_policy="run_all",
                max_catchup=10,
            )
            create_task(api, body)
        booted = datetime.now(UTC)
        for label in DISPATCHERS:
            stack.start("dispatcher", name=label)
        start_worker(stack, "w-cron", threads=8)
        wait_dispatchers(url, len(DISPATCHERS), since=booted)

        per_wave = CRON_TASKS // WAVES
        for wave in range(WAVES):
            group = names[wave * per_wave : (wave + 1) * per_wave]
            rows = query(
                url,
                "UPDATE tasks SET next_fire_at = date_trunc('minute', now()) - %s * interval '1 minute'"
                " WHERE name = ANY(%s) RETURNING name, next_fire_at, now() AS at",
                (BACKLOG_MINUTES, group),
            )
            starts.update({r["name"]: r["next_fire_at"] for r in rows})
            backdated_at.update({r["name"]: r["at"] for r in rows})
            time.sleep(rng.uniform(0.0, 0.4))
            if wave in (1, 3):  # SIGKILL one dispatcher while the others are firing, restart it
                victim = DISPATCHERS[wave % len(DISPATCHERS)]
                proc = stack.procs[victim]
                stack.stop(victim, signal.SIGKILL)
                assert proc.returncode == -signal.SIGKILL
                time.sleep(rng.uniform(0.3, 1.5))
                stack.start("dispatcher", name=victim)

        expected_min = CRON_TASKS * (BACKLOG_MINUTES + 1)

        def fired() -> bool:
            rows = query(url, "SELECT count(*) AS n FROM runs WHERE trigger = 'schedule'")
            return int(rows[0]["n"]) >= expected_min

        wait_for(fired, timeout=60, interval=0.2, what=f"{expected_min} cron slots fired")
        # Stop the live minute from adding slots, then let every queued run finish.
        query(url, "UPDATE tasks SET enabled = false")
        wait_quiet(url, timeout=90)
        alive = [label for label in DISPATCHERS if stack.procs[label].poll() is None]
        assert alive == list(DISPATCHERS), "a dispatcher died on its own"

    runs = all_runs(url)
    tasks = {r["name"]: r for r in query(url, "SELECT name, next_fire_at FROM tasks")}
    assert len(runs) >= expected_min >= 200
    assert {r["trigger"] for r in runs} == {"schedule"}
    per_slot = Counter((r["task_id"], r["scheduled_for"]) for r in runs)
    doubled = [k for k, n in per_slot.items() if n > 1]
    assert not doubled, f"slots fired more than once: {doubled[:10]}"
    not_ok = [(r["id"], r["status"], r["reason"], r["error"]) for r in runs]
    not_ok = [x for x in not_ok if x[1] != "succeeded"]
    assert not not_ok, f"runs that did not succeed: {not_ok[:10]}"
    for name in names:
        slots = sorted(r["scheduled_for"] for r in runs if r["task_name"] == name)
        start, last = starts[name], slots[-1]
        expected = [start + k * MINUTE for k in range(int((last - start) / MINUTE) + 1)]
        assert slots == expected, f"{name}: slots {slots} are not every minute from {start}"
        assert last >= backdated_at[name].replace(second=0, microsecond=0), name
        assert tasks[name]["next_fire_at"] == last + MINUTE, (name, tasks[name], last)
    print(f"{len(runs)} slots over {CRON_TASKS} tasks, each fired and executed once")
    assert_each_once(ran, {r["id"] for r in runs})


# -- 2. workers killed mid-run ------------------------------------------------------------------

KILLS = 20
HB_INTERVAL = 0.5
HB_TIMEOUT = 4.0
MAX_RETRIES = 3


def _status(url: str, run_id: int) -> str:
    return str(query(url, "SELECT status FROM runs WHERE id = %s", (run_id,))[0]["status"])


def _running_on(url: str, worker: str) -> bool:
    rows = query(
        url, "SELECT 1 FROM runs WHERE worker = %s AND status = 'running' LIMIT 1", (worker,)
    )
    return bool(rows)


def test_worker_sigkilled_mid_run_twenty_times_loses_nothing_and_runs_nothing_twice(
    settings: Settings, admin_key: str, tmp_path: Path
) -> None:
    s = shell_only(
        settings,
        heartbeat_interval_seconds=HB_INTERVAL,
        heartbeat_timeout_seconds=HB_TIMEOUT,
        poll_interval_seconds=0.5,
        # Messages a killed worker had prefetched but not claimed are lost with it; they must be
        # re-sent within the test (Dramatiq's own requeue of a dead consumer takes 60 s).
        redispatch_after_seconds=3.0,
    )
    url = _db(s)
    started, done = tmp_path / "started.txt", tmp_path / "done.txt"
    command = record_command(started, then=f"sleep 3; {record_command(done)}")
    names = [f"victim-{i}" for i in range(5)]
    kills: dict[str, float] = {}
    rng = random.Random(7)
    with own_stack(s, admin_key, tmp_path / "logs") as stack, stack.client() as api:
        stack.start("api")
        stack.wait_healthy()
        stack.start("dispatcher")
        for name in names:
            body = task_body(name, command, max_retries=MAX_RETRIES, retry_delay_seconds=0)
            create_task(api, body)

        # Kill 1, watched closely: failed as 'worker lost' in time, retried, retry succeeds.
        first = trigger(api, names[0])
        start_worker(stack, "lost-00")
        wait_for(lambda: _status(url, first) == "running", timeout=30, what="first run running")
        time.sleep(0.5)
        stack.stop("lost-00", signal.SIGKILL)
        kills["lost-00"] = killed = time.time()
        start_worker(stack, "live-0")  # boots while the reaper waits; nothing else is queued
        wait_for(
            lambda: _status(url, first) != "running",
            timeout=HB_TIMEOUT + 10,
            interval=0.1,
            what="the killed worker's run to be reaped",
        )
        noticed = time.time() - killed
        run = api.get(f"/api/runs/{first}").json()
        assert run["status"] == "failed", run
        assert run["error"] == "worker lost" and run["reason"] == "worker lost", run
        assert noticed <= HB_TIMEOUT + 10, noticed
        retries = query(url, "SELECT * FROM runs WHERE retry_of = %s", (first,))
        assert len(retries) == 1, retries
        retry = retries[0]
        assert (retry["attempt"], retry["trigger"]) == (2, "retry"), retry
        retried = wait_run(api, retry["id"], timeout=30)
        assert (retried["status"], retried["worker"]) == ("succeeded", "live-0"), retried
        stack.stop("live-0")
        print(f"kill 1: run {first} failed as 'worker lost' {noticed:.1f} s after SIGKILL")

        # Kills 2..20: a new run each time, a fresh worker, SIGKILL once it has claimed one.
        loop_start = time.monotonic()
        for i in range(1, KILLS):
            trigger(api, names[i % len(names)])
            label = f"lost-{i:02d}"
            start_worker(stack, label)
            wait_for(lambda lb=label: _running_on(url, lb), timeout=30, what=f"{label} to claim")
            time.sleep(rng.uniform(0.0, 0.5))
            stack.stop(label, signal.SIGKILL)
            kills[label] = time.time()

        settle_start = time.monotonic()
        start_worker(stack, "stable", threads=8)
        wait_quiet(url, timeout=120)
        print(
            f"{KILLS - 1} kill cycles took {settle_start - loop_start:.1f} s; "
            f"the stable worker finished every chain in {time.monotonic() - settle_start:.1f} s"
        )
        assert stack.procs["dispatcher"].poll() is None

    runs = all_runs(url)
    by_chain = chains(runs)
    assert len(by_chain) == KILLS, sorted(by_chain)
    for chain in by_chain.values():
        assert chain[0]["trigger"] == "manual"
        check_chain(chain, max_retries=MAX_RETRIES)
    lost = [r for r in runs if r["error"] == "worker lost"]
    assert len(lost) >= KILLS
    for r in lost:
        assert r["reason"] == "worker lost" and r["worker"] in kills, r
        late = r["finished_at"] - utc(kills[r["worker"]])
        assert late <= timedelta(seconds=HB_TIMEOUT + 10), (r["id"], late)
    other_failures = [r for r in runs if r["status"] != "succeeded" and r not in lost]
    assert not other_failures, other_failures
    exhausted = [c[-1]["id"] for c in by_chain.values() if c[-1]["status"] != "succeeded"]
    print(
        f"{len(runs)} runs in {len(by_chain)} chains; {len(lost)} failed as 'worker lost'; "
        f"chains that exhausted their retries: {exhausted}"
    )

    # A run id is never executed twice. (A worker killed after its command ended but before it
    # recorded the result leaves a completed command behind a 'worker lost' run: at least once.)
    began = {r["id"] for r in runs if r["started_at"] is not None}
    succeeded = {r["id"] for r in runs if r["status"] == "succeeded"}
    for path in (started, done):
        counts = Counter(executed_ids(path))
        assert not [i for i, n in counts.items() if n > 1], f"{path.name}: twice: {counts}"
        assert succeeded <= set(counts) <= began, path.name
    assert set(executed_ids(done)) <= set(executed_ids(started))


# -- 3 and 4. broker down or flushed ---------------------------------------------------------


def test_broker_down_triggers_still_202_and_every_run_completes_once_when_it_returns(
    settings: Settings, admin_key: str, tmp_path: Path
) -> None:
    valkey = EmbeddedValkey(tmp_path / "valkey")
    port = free_port()
    ran = tmp_path / "ran.txt"
    try:
        s = shell_only(settings, broker_url=valkey.start(port=port))
        url = _db(s)
        with own_stack(s, admin_key, tmp_path / "logs") as stack, stack.client() as api:
            stack.start("api")
            stack.wait_healthy()
            stack.start("dispatcher")
            start_worker(stack, "w-broker")
            create_task(api, task_body("via-broker", record_command(ran)))
            before = trigger(api, "via-broker")
            assert wait_run(api, before)["status"] == "succeeded"

            valkey.stop()
            ids, took = [], []
            for _ in range(10):
                t0 = time.monotonic()
                ids.append(trigger(api, "via-broker"))
                took.append(time.monotonic() - t0)
            print("trigger while the broker is down:", summary(took))
            assert max(took) < 5.0, took  # the API never touches the broker
            time.sleep(3)  # the dispatcher tries to send, fails and gives the runs back
            statuses = {api.get(f"/api/runs/{i}").json()["status"] for i in ids}
            assert statuses == {"queued"}
            assert stack.procs["dispatcher"].poll() is None, "dispatcher died with the broker"
            assert stack.procs["w-broker"].poll() is None, "worker died with the broker"

            valkey.start(port=port)
            for run_id in ids:
                assert wait_run(api, run_id, timeout=60)["status"] == "succeeded"
            wait_quiet(url, timeout=10)
    finally:
        valkey.stop()
    assert_each_once(ran, {before, *ids})


def test_dispatcher_backs_off_while_the_broker_is_down(
    settings: Settings, admin_key: str, tmp_path: Path
) -> None:
    """A down broker costs one failed send per poll, not a hot claim/undo loop on Postgres."""
    valkey = EmbeddedValkey(tmp_path / "valkey")
    logs = tmp_path / "logs"
    try:
        s = shell_only(
            settings, broker_url=valkey.start(port=free_port()), poll_interval_seconds=0.5
        )
        with own_stack(s, admin_key, logs) as stack, stack.client() as api:
            stack.start("api")
            stack.wait_healthy()
            stack.start("dispatcher")
            create_task(api, task_body("waits", "true"))
            valkey.stop()
            trigger(api, "waits")
            time.sleep(1.0)
            window = 3.0

            def failed_sends() -> int:
                return stack.log_text("dispatcher").count("broker unavailable")

            before = failed_sends()
            time.sleep(window)
            attempts = failed_sends() - before
            assert stack.procs["dispatcher"].poll() is None
    finally:
        valkey.stop()
    allowed = 2 * window / s.poll_interval_seconds
    print(
        f"failed sends in {window:.0f} s with the broker down: {attempts} (allowed {allowed:.0f})"
    )
    assert 0 < attempts <= allowed, (
        f"the dispatcher retried the send {attempts} times in {window:.0f} s "
        "(claim_dispatch + undo_dispatch each time): it spins while the broker is down"
    )


def test_broker_flushed_lost_messages_are_sent_again_and_run_once(
    settings: Settings, admin_key: str, tmp_path: Path
) -> None:
    valkey = EmbeddedValkey(tmp_path / "valkey")
    ran = tmp_path / "ran.txt"
    try:
        broker_url = valkey.start(port=free_port())
        s = shell_only(settings, broker_url=broker_url, redispatch_after_seconds=2.0)
        url = _db(s)
        with own_stack(s, admin_key, tmp_path / "logs") as stack, stack.client() as api:
            stack.start("api")
            stack.wait_healthy()
            stack.start("dispatcher")  # no worker yet: messages wait in the broker
            create_task(api, task_body("flushed", record_command(ran)))
            ids = [trigger(api, "flushed") for _ in range(10)]

            def all_sent() -> bool:
                rows = query(url, "SELECT count(dispatched_at) AS n FROM runs")
                return int(rows[0]["n"]) == len(ids)

            wait_for(all_sent, timeout=20, what="every run sent to the broker")
            client = redis.Redis.from_url(broker_url)
            try:
                assert client.dbsize() > 0
                # The dispatcher keeps re-sending stale runs meanwhile: flush and count in one
                # MULTI so a re-send that lands right after the flush cannot be counted here.
                flushed_at = datetime.now(UTC)
                pipe = client.pipeline(transaction=True)
                _, left = pipe.flushall().dbsize().execute()
                assert left == 0
            finally:
                client.close()

            start_worker(stack, "w-flush")
            for run_id in ids:
                assert wait_run(api, run_id, timeout=30)["status"] == "succeeded"
            wait_quiet(url, timeout=10)
    finally:
        valkey.stop()
    runs = {r["id"]: r for r in all_runs(url)}
    resent = [i for i in ids if runs[i]["dispatched_at"] >= flushed_at]
    assert sorted(resent) == sorted(ids), "a run completed without being sent again"
    assert_each_once(ran, set(ids))


# -- 5. Postgres restarted -------------------------------------------------------------------


def _outage_request(api: httpx.Client, method: str, path: str) -> float:
    """One request while Postgres is down: a 503 problem+json, never a 500 or a traceback."""
    t0 = time.monotonic()
    resp = api.request(method, path)
    took = time.monotonic() - t0
    assert resp.status_code == 503, (method, path, resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem = resp.json()
    assert problem["status"] == 503 and problem["detail"], problem
    assert "Traceback" not in resp.text
    return took


def _outage_requests(api: httpx.Client) -> list[float]:
    calls = [("GET", "/api/tasks"), ("POST", "/api/tasks/through-restart/trigger")]
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda c: _outage_request(api, *c), calls))


def test_postgres_restart_api_answers_503_and_every_run_ends_once(
    settings: Settings, tmp_path: Path
) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg")
    port = free_port()
    ran = tmp_path / "ran.txt"
    logs = tmp_path / "logs"
    try:
        url = pg.start(port=port)
        migrate(url)
        s = shell_only(settings, database_url=url, data_dir=tmp_path / "home")
        with Store(url, min_size=1, max_size=2) as store:
            ensure_admin_key(store, s.admin_key_path)
        key = s.admin_key_path.read_text().strip()
        with own_stack(s, key, logs) as stack, stack.client() as api:
            stack.start("api")
            stack.wait_healthy()
            stack.start("dispatcher")
            start_worker(stack, "w-pg", threads=8)  # threads to spare during the outage
            command = record_command(ran, then="sleep 2")
            task = create_task(
                api, task_body("through-restart", command, max_retries=2, retry_delay_seconds=0)
            )
            ids = [trigger(api, "through-restart") for _ in range(6)]
            wait_for(
                lambda: len(executed_ids(ran)) == len(ids), timeout=20, what="commands started"
            )
            # One more run, sent by the dispatcher just before Postgres goes away (marked sent,
            # its message delivered during the outage): a race any restart can hit.
            late = query(
                url,
                "INSERT INTO runs (task_id, trigger, dispatched_at) VALUES (%s, 'manual', now())"
                " RETURNING id",
                (task["id"],),
            )[0]["id"]

            pg.stop()
            down_at = time.monotonic()
            broker = make_broker(s)
            try:
                send_run(broker, late, queue="default")
            finally:
                broker.close()
            took = _outage_requests(api)
            print(f"503 while Postgres is down, answered in {[round(t, 2) for t in took]} s")
            assert max(took) < 20, took  # the pool timeout (10 s), never a hang
            time.sleep(max(0.0, 3.0 - (time.monotonic() - down_at)))  # the commands end
            outage = time.monotonic() - down_at
            assert pg.start(port=port) == url
            back_at = time.monotonic()

            def api_back() -> bool:
                return api.get("/api/tasks").status_code == 200

            wait_for(api_back, timeout=30, what="the API to reach Postgres again")

            def chains_done() -> bool:
                by_chain = chains(all_runs(url))
                return all(by_chain[i][-1]["status"] == "succeeded" for i in ids)

            wait_for(chains_done, timeout=60, interval=0.5, what="every chain to succeed")
            for label in ("api", "dispatcher", "w-pg"):
                assert stack.procs[label].poll() is None, f"{label} died with Postgres"
            runs = all_runs(url)
            by_chain = chains(runs)
            for root in ids:
                chain = by_chain.pop(root)
                check_chain(chain, max_retries=2)
                assert [r["status"] for r in chain].count("succeeded") == 1, chain
            assert list(by_chain) == [late], f"unexpected runs: {by_chain}"
            retried = {root: len(c) for root, c in chains(runs).items() if len(c) > 1}
            print(f"Postgres away for {outage:.1f} s; chains needing a retry: {retried}")
            counts = Counter(executed_ids(ran))
            assert not [i for i, n in counts.items() if n > 1], f"executed twice: {counts}"
            api_log = (logs / "api.log").read_text(errors="replace")
            assert "Traceback" not in api_log, api_log[-3000:]

            # The run whose message arrived while the database was away must not wait for the
            # stale-send rule (redispatch_after_seconds, 300 s by default) once Postgres is back.
            def late_done() -> bool:
                return _status(url, late) not in ("queued", "running")

            wait_for(
                late_done,
                timeout=max(5.0, 30 - (time.monotonic() - back_at)),
                interval=0.5,
                what=f"run {late}, delivered during the outage, to run after Postgres came back",
            )
            assert _status(url, late) == "succeeded"
            wait_quiet(url, timeout=30)
    finally:
        pg.stop()


# -- 6. queues -----------------------------------------------------------------------------


def _workers(api_stack: Stack) -> dict[str, dict[str, object]]:
    with api_stack.client() as api:
        resp = api.get("/api/workers")
    assert resp.status_code == 200, resp.text
    return {w["name"]: w for w in resp.json()}


def test_queue_routes_runs_to_the_workers_of_that_queue(
    settings: Settings, admin_key: str, tmp_path: Path
) -> None:
    url = _db(settings)
    with (
        own_stack(shell_only(settings), admin_key, tmp_path / "logs") as stack,
        stack.client() as api,
    ):
        stack.start("api")
        stack.wait_healthy()
        stack.start("dispatcher")
        start_worker(stack, "wq-default", "--queues", "default")
        start_worker(stack, "wq-reports", "--queues", "reports")
        wait_worker_alive(url, "wq-default")
        wait_worker_alive(url, "wq-reports")
        create_task(api, task_body("report", "true", queue="reports"))
        create_task(api, task_body("plain", "true"))
        create_task(api, task_body("slow-report", "sleep 4", queue="reports"))

        reports = [trigger(api, "report") for _ in range(5)]
        plain = [trigger(api, "plain") for _ in range(5)]
        for run_id in reports:
            run = wait_run(api, run_id)
            assert (run["status"], run["worker"], run["queue"]) == (
                "succeeded",
                "wq-reports",
                "reports",
            ), run
        for run_id in plain:
            run = wait_run(api, run_id)
            assert (run["status"], run["worker"]) == ("succeeded", "wq-default"), run

        slow = trigger(api, "slow-report")
        wait_for(lambda: _status(url, slow) == "running", timeout=20, what="slow report running")

        def loaded() -> dict[str, dict[str, object]] | None:
            # `running` is each worker's last heartbeat, so wait for both snapshots to settle
            workers = _workers(stack)
            settled = (
                workers["wq-reports"]["running"] == 1 and workers["wq-default"]["running"] == 0
            )
            return workers if settled else None

        workers = wait_for(loaded, timeout=10, what="/api/workers to show the running report")
        assert workers["wq-reports"]["queues"] == ["reports"]
        assert workers["wq-default"]["queues"] == ["default"]
        assert workers["wq-default"]["running"] == 0
        assert workers["wq-reports"]["alive"] is True and workers["wq-default"]["alive"] is True
        run = wait_run(api, slow, timeout=20)
        assert (run["status"], run["worker"]) == ("succeeded", "wq-reports")


# -- 7. pick-up latency ----------------------------------------------------------------------


def test_idle_worker_picks_up_a_new_run_quickly(stack: Stack) -> None:
    url = _db(stack.settings)
    with stack.client() as api:
        create_task(api, task_body("quick", "true"))
        assert wait_run(api, trigger(api, "quick"))["status"] == "succeeded"  # warm-up
        pickup: list[float] = []
        for _ in range(20):
            time.sleep(0.3)  # let the worker go idle (its consumer backs off when empty)
            run = wait_run(api, trigger(api, "quick"))
            assert run["status"] == "succeeded", run
            row = query(
                url, "SELECT started_at - queued_at AS d FROM runs WHERE id = %s", (run["id"],)
            )
            pickup.append(row[0]["d"].total_seconds())
    print("trigger -> running:", summary(pickup))
    assert statistics.median(pickup) < 0.5, summary(pickup)
