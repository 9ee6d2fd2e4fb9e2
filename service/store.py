"""The Store: the one place that talks to PostgreSQL. Queries come by name from queries.sql."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import cache
from importlib.resources import files
from typing import Any, Protocol

import msgspec
import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from service.errors import ConflictError, NotFoundError, UnavailableError, ValidationError
from service.lifecycle import retry_delay
from service.models import ApiKey, Run, RunResult, Task


class Planner(Protocol):
    """Plans one due task's firing (service.firing.plan_firing)."""

    def __call__(self, task: Task, now: datetime, *, active: bool) -> Any: ...


_BLOCK_RE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_JSON_FIELDS = ("spec", "env", "parameters", "detail", "notify")
DEPENDENCY_LOCK = 0x6E62_6372_6F6E  # advisory lock id serialising dependency-graph writes


@cache
def queries() -> dict[str, str]:
    """Named SQL blocks from service/queries.sql."""
    text = files("service").joinpath("queries.sql").read_text()
    parts = _BLOCK_RE.split(text)
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts), 2)}


def _params(values: dict[str, Any]) -> dict[str, Any]:
    """Wrap dict fields as jsonb."""
    return {k: Jsonb(v) if k in _JSON_FIELDS and v is not None else v for k, v in values.items()}


def _result_arrays(results: Sequence[RunResult]) -> dict[str, list[Any]]:
    """The column arrays `finish_runs` unnests, one element per run."""
    return {
        "ids": [r.run_id for r in results],
        "statuses": [r.status for r in results],
        "exit_codes": [r.exit_code for r in results],
        "errors": [r.error for r in results],
    }


class Tx:
    """One transaction: run named queries on a connection."""

    def __init__(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        self.conn = conn

    def all(self, query: str, /, **params: Any) -> list[dict[str, Any]]:
        cur = self.conn.execute(queries()[query], _params(params), prepare=True)
        return cur.fetchall() if cur.description else []

    def one(self, query: str, /, **params: Any) -> dict[str, Any] | None:
        rows = self.all(query, **params)
        return rows[0] if rows else None

    def run(self, query: str, /, **params: Any) -> int:
        return self.conn.execute(queries()[query], _params(params), prepare=True).rowcount


@contextmanager
def _translated() -> Iterator[None]:
    """Turn driver errors into nbcron errors at the store boundary."""
    try:
        yield
    except pg_errors.UniqueViolation as exc:
        raise ConflictError(_constraint_detail(exc)) from exc
    except (pg_errors.CheckViolation, pg_errors.NotNullViolation) as exc:
        raise ValidationError(_constraint_detail(exc)) from exc
    except psycopg.DataError as exc:  # a value Postgres cannot hold: NUL in text, out of range
        raise ValidationError(f"invalid value: {exc.diag.message_primary or exc}") from exc
    except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
        raise UnavailableError("the database is not reachable right now; try again") from exc


def _constraint_detail(exc: psycopg.Error) -> str:
    diag = exc.diag
    if diag.constraint_name == "tasks_name_key":
        return "a task with this name already exists"
    return diag.message_primary or str(exc)


class Listener:
    """LISTEN on one channel; `wait` returns when a notification arrives or time is up."""

    def __init__(self, url: str, channel: str) -> None:
        with _translated():
            self.conn = psycopg.connect(url, autocommit=True)
            self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    def wait(self, seconds: float) -> set[str]:
        """Block up to `seconds` for a notification; drain any burst; the payloads that came
        (empty when none did)."""
        payloads: set[str] = set()
        with _translated():
            for note in self.conn.notifies(timeout=seconds, stop_after=1):
                payloads.add(note.payload)
            if payloads:  # one insert storm costs one wake-up
                payloads.update(note.payload for note in self.conn.notifies(timeout=0.0))
        return payloads

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.conn.close()


class Store:
    """Owns the connection pool; every database read and write goes through it."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10) -> None:
        self.url = url
        self.pool = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            kwargs={"row_factory": dict_row, "autocommit": True},
            open=False,
            timeout=10.0,
            reconnect_timeout=0,
        )

    def open(self, *, wait: bool = True) -> Store:
        """Open the pool (and wait for a first connection when `wait`)."""
        with _translated():
            self.pool.open(wait=wait, timeout=10.0)
        return self

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Store:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def auto(self) -> Iterator[Tx]:
        """Single statements, each its own implicit transaction: no BEGIN/COMMIT round trips."""
        with _translated(), self.pool.connection() as conn:
            yield Tx(conn)

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        """A transaction, committed on success, with driver errors translated."""
        with _translated(), self.pool.connection() as conn, conn.transaction():
            yield Tx(conn)

    def listener(self, channel: str) -> Listener:
        """A dedicated connection, outside the pool, listening on `channel`."""
        return Listener(self.url, channel)

    # -- tasks -------------------------------------------------------------

    def insert_task(self, values: dict[str, Any]) -> Task:
        with self.tx() as tx:
            self._check_dependencies(tx, values["name"], values["depends_on"])
            row = tx.one("insert_task", **values)
        assert row is not None
        return Task.from_row(row)

    def update_task(self, task_id: int, values: dict[str, Any]) -> Task:
        with self.tx() as tx:
            self._check_dependencies(tx, values["name"], values["depends_on"])
            row = tx.one("update_task", id=task_id, **values)
        if row is None:
            raise NotFoundError(f"task {task_id} not found")
        return Task.from_row(row)

    def _check_dependencies(self, tx: Tx, name: str, depends_on: Sequence[str]) -> None:
        """Unknown upstreams and cycles are rejected at write time (422 naming depends_on)."""
        if not depends_on:
            return
        tx.one("dependency_write_lock", lock=DEPENDENCY_LOCK)
        found = {r["name"] for r in tx.all("existing_task_names", names=list(depends_on))}
        missing = sorted(set(depends_on) - found)
        if missing:
            raise ValidationError(
                f"unknown upstream task(s): {', '.join(missing)}", field="depends_on"
            )
        graph = {r["name"]: r["depends_on"] for r in tx.all("dependency_graph")}
        graph[name] = list(depends_on)
        cycle = find_cycle(graph, name)
        if cycle:
            raise ValidationError(f"dependency cycle: {' -> '.join(cycle)}", field="depends_on")

    def get_task(self, ref: str | int) -> Task:
        """A task by numeric id or by name."""
        return Task.from_row(self._task_row(ref, "get_task_by_id", "get_task_by_name"))

    def _task_row(self, ref: str | int, by_id: str, by_name: str) -> dict[str, Any]:
        """One row of `by_id` for a numeric ref, else of `by_name`; NotFoundError when none."""
        text = str(ref)
        with self.auto() as tx:
            row = tx.one(by_id, id=int(text)) if text.isdigit() else tx.one(by_name, name=text)
        if row is None:
            raise NotFoundError(f"task {text!r} not found")
        return row

    def list_tasks(self, *, limit: int, cursor: int | None = None, **filters: Any) -> list[Task]:
        params = {"enabled": None, "executor": None, "tag": None, "q": None} | filters
        with self.auto() as tx:
            rows = tx.all("list_tasks", limit=limit, cursor=cursor, **params)
        return [Task.from_row(r) for r in rows]

    def delete_task(self, task_id: int) -> None:
        with self.auto() as tx:
            if tx.one("delete_task", id=task_id) is None:
                raise NotFoundError(f"task {task_id} not found")

    # -- runs --------------------------------------------------------------

    def create_run(
        self,
        task: Task,
        *,
        trigger: str,
        parameters: dict[str, Any],
        idempotency_key: str | None = None,
        audit: dict[str, Any] | None = None,
    ) -> tuple[Run, bool]:
        """Queue a run (and its audit row, in the same transaction); the same idempotency key
        returns the same run with created=False."""
        with self.tx() as tx:
            row = tx.one(
                "insert_run",
                task_id=task.id,
                trigger=trigger,
                attempt=1,
                retry_of=None,
                parameters=parameters,
                queue=task.queue,
                scheduled_for=None,
                not_before=None,
                idempotency_key=idempotency_key,
            )
            created = row is not None
            if row is None:
                row = tx.one(
                    "get_run_by_idempotency_key", task_id=task.id, idempotency_key=idempotency_key
                )
            elif audit is not None:
                detail = {**audit.get("detail", {}), "run_id": row["id"]}
                tx.run("insert_audit", **(audit | {"detail": detail}))
        assert row is not None
        return Run.from_row(row | {"task_name": task.name}), created

    def get_run(self, run_id: int) -> Run:
        with self.auto() as tx:
            row = tx.one("get_run", id=run_id)
        if row is None:
            raise NotFoundError(f"run {run_id} not found")
        return Run.from_row(row)

    def list_runs(
        self,
        *,
        limit: int,
        cursor: int | None = None,
        task_id: int | None = None,
        status: str | None = None,
    ) -> list[Run]:
        with self.auto() as tx:
            rows = tx.all("list_runs", limit=limit, cursor=cursor, task_id=task_id, status=status)
        return [Run.from_row(r) for r in rows]

    def cancel_run(self, run_id: int, *, reason: str = "cancelled by user") -> Run:
        """Cancel a queued run at once, or ask the worker to stop a running one."""
        with self.tx() as tx:
            row = tx.one("cancel_queued_run", id=run_id, reason=reason)
            if row is None:
                row = tx.one("request_cancel_running", id=run_id)
        if row is None:
            run = self.get_run(run_id)
            raise ConflictError(f"run {run_id} is {run.status} and cannot be cancelled")
        return self.get_run(run_id)

    def get_logs(self, run_id: int, *, offset: int = 0) -> list[dict[str, Any]]:
        with self.auto() as tx:
            return tx.all("get_logs", run_id=run_id, offset=offset)

    # -- dispatch and execution ------------------------------------------

    def fire_due(self, *, now: datetime, planner: Planner, limit: int) -> tuple[int, int]:
        """Fire up to `limit` due tasks in one transaction; return (tasks fired, runs queued).

        The whole batch costs a handful of statements, whatever its size: the plans are made in
        Python, then applied with one statement per kind of write.
        """
        with self.tx() as tx:
            tasks = [Task.from_row(row) for row in tx.all("due_tasks", now=now, limit=limit)]
            if not tasks:
                return 0, 0
            watched = [t.id for t in tasks if t.overlap_policy != "allow"]
            active = (
                {r["task_id"] for r in tx.all("active_tasks", ids=watched)} if watched else set()
            )
            plans = [(task, planner(task, now, active=task.id in active)) for task in tasks]
            for task, plan in plans:
                if plan.cancel_active:  # before the new slot is queued, which it must not cancel
                    tx.run("cancel_active_runs", task_id=task.id, reason="replaced by a newer slot")
            queued = self._queue_slots(tx, plans)
            self._record_missed(
                tx,
                "schedule",
                [(t.id, t.queue, slot, why) for t, p in plans for slot, why in p.missed],
            )
            tx.run(
                "set_next_fire_times",
                ids=[t.id for t, _ in plans],
                ats=[p.next_fire_at for _, p in plans],
            )
        return len(tasks), queued

    @staticmethod
    def _queue_slots(tx: Tx, plans: Sequence[tuple[Task, Any]]) -> int:
        slots = [(task, slot) for task, plan in plans for slot in plan.run_slots]
        if not slots:
            return 0
        return tx.run(
            "insert_slot_runs",
            task_ids=[t.id for t, _ in slots],
            queues=[t.queue for t, _ in slots],
            slots=[slot for _, slot in slots],
        )

    @staticmethod
    def _record_missed(
        tx: Tx, trigger: str, missed: Sequence[tuple[int, str, datetime | None, str]]
    ) -> None:
        """Insert runs recorded as missed: (task id, queue, slot, reason) each."""
        if missed:
            task_ids, queues, slots, reasons = (
                list(column) for column in zip(*missed, strict=True)
            )
            tx.run(
                "insert_missed_runs",
                trigger=trigger,
                task_ids=task_ids,
                queues=queues,
                slots=slots,
                reasons=reasons,
            )

    def claim_dispatch(self, *, limit: int, redispatch_after: float) -> list[dict[str, Any]]:
        with self.auto() as tx:
            return tx.all("claim_dispatch", limit=limit, redispatch_after=redispatch_after)

    def undo_dispatch(self, ids: list[int]) -> None:
        with self.auto() as tx:
            tx.run("undo_dispatch", ids=ids)

    def dispatcher_heartbeat(self, name: str) -> None:
        with self.auto() as tx:
            tx.run("dispatcher_heartbeat", name=name)

    def next_work_at(self) -> tuple[datetime | None, datetime | None]:
        """(earliest unsent queued run, earliest cron slot), each None when there is none."""
        with self.auto() as tx:
            row = tx.one("next_work_at")
        assert row is not None
        return row["pending_at"], row["fire_at"]

    def claim_runs(self, run_ids: Sequence[int], *, worker: str) -> dict[int, dict[str, Any]]:
        """Claim queued runs in one statement; runs already claimed, cancelled or gone are absent."""
        with self.auto() as tx:
            rows = tx.all("claim_runs", ids=list(run_ids), worker=worker)
        return {row["id"]: row for row in rows}

    def claim_run(self, run_id: int, *, worker: str) -> dict[str, Any] | None:
        return self.claim_runs([run_id], worker=worker).get(run_id)

    def finish_runs(self, results: Sequence[RunResult]) -> dict[int, dict[str, Any]]:
        """Record results that need no follow-up (no retry, no dependents) in one statement."""
        with self.auto() as tx:
            rows = tx.all("finish_runs", **_result_arrays(results))
        return {row["id"]: row for row in rows}

    def finish_run(
        self, result: RunResult, *, retry_delay: float | None, has_dependents: bool = True
    ) -> dict[str, Any] | None:
        """Record the result and, in the same transaction, queue the next attempt or
        release/miss dependents; with neither to do it is one statement."""
        if retry_delay is None and not has_dependents:
            return self.finish_runs([result]).get(result.run_id)
        with self.tx() as tx:
            row = tx.one("finish_runs", **_result_arrays([result]))
            if row is not None:
                self._follow_up(tx, row, status=result.status, retry_delay=retry_delay)
        return row

    def _follow_up(
        self, tx: Tx, run: dict[str, Any], *, status: str, retry_delay: float | None
    ) -> None:
        """The next attempt, or (once final) release or miss the dependent tasks."""
        if retry_delay is not None:
            tx.run("insert_retry", id=run["id"], delay=retry_delay)
        elif status == "succeeded":
            self._release_dependents(tx, run["task_name"])
        elif status in ("failed", "timed_out"):
            self._miss_dependents(tx, run["task_name"])

    def _release_dependents(self, tx: Tx, upstream: str) -> None:
        """Queue each dependent whose upstreams have all succeeded since its own last run."""
        for task in tx.all("dependents_of", name=upstream):
            tx.one("lock_task", id=task["id"])  # concurrent upstream finishes queue it once
            ready = tx.one("upstreams_ready", task_id=task["id"], depends_on=task["depends_on"])
            if ready and ready["ready"]:
                tx.one(
                    "insert_run",
                    task_id=task["id"],
                    trigger="dependency",
                    attempt=1,
                    retry_of=None,
                    parameters={},
                    queue=task["queue"],
                    scheduled_for=None,
                    not_before=None,
                    idempotency_key=None,
                )

    def _miss_dependents(self, tx: Tx, upstream: str) -> None:
        reason = f"upstream failed: {upstream}"
        dependents = tx.all("dependents_of", name=upstream)
        self._record_missed(
            tx, "dependency", [(d["id"], d["queue"], None, reason) for d in dependents]
        )

    def reap_lost_runs(self, *, timeout: float) -> list[dict[str, Any]]:
        """Fail runs whose worker stopped heartbeating ('worker lost') and queue their retries."""
        with self.tx() as tx:
            lost = tx.all("reap_lost_runs", timeout=timeout)
            for row in lost:
                delay = retry_delay(
                    status="failed",
                    attempt=row["attempt"],
                    max_retries=row["max_retries"],
                    base=row["retry_delay_seconds"],
                )
                self._follow_up(tx, row, status="failed", retry_delay=delay)
        return lost

    def append_log(self, run_id: int, seq: int, data: str) -> None:
        with self.tx() as tx:
            tx.run("append_log", run_id=run_id, seq=seq, data=data)
            tx.run("add_log_bytes", id=run_id, n=len(data.encode()))

    def cancel_flags(self, ids: list[int]) -> set[int]:
        with self.auto() as tx:
            return {r["id"] for r in tx.all("cancel_flags", ids=ids)}

    def heartbeat_worker(
        self,
        *,
        name: str,
        hostname: str,
        pid: int,
        queues: list[str],
        threads: int,
        running: list[int],
    ) -> None:
        with self.tx() as tx:
            tx.run(
                "upsert_worker",
                name=name,
                hostname=hostname,
                pid=pid,
                queues=queues,
                threads=threads,
                running=len(running),
            )
            if running:
                tx.run("heartbeat_runs", ids=running)

    def stop_worker(self, name: str) -> None:
        with self.auto() as tx:
            tx.run("stop_worker", name=name)

    def list_workers(self, *, timeout: float) -> list[dict[str, Any]]:
        with self.auto() as tx:
            return tx.all("list_workers", timeout=timeout)

    # -- keys and audit ---------------------------------------------------

    def insert_api_key(self, *, name: str, role: str, prefix: str, key_hash: str) -> ApiKey:
        with self.auto() as tx:
            row = tx.one("insert_api_key", name=name, role=role, prefix=prefix, key_hash=key_hash)
        assert row is not None
        return ApiKey.from_row(row)

    def key_by_prefix(self, prefix: str) -> dict[str, Any] | None:
        with self.auto() as tx:
            return tx.one("get_api_key_by_prefix", prefix=prefix)

    def touch_key(self, key_id: int) -> None:
        with self.auto() as tx:
            tx.run("touch_api_key", id=key_id)

    def list_api_keys(self) -> list[ApiKey]:
        with self.auto() as tx:
            return [ApiKey.from_row(r) for r in tx.all("list_api_keys")]

    def revoke_api_key(self, key_id: int) -> ApiKey:
        with self.auto() as tx:
            row = tx.one("revoke_api_key", id=key_id)
        if row is None:
            raise NotFoundError(f"api key {key_id} not found")
        return ApiKey.from_row(row)

    def count_admin_keys(self) -> int:
        with self.auto() as tx:
            row = tx.one("count_admin_keys")
        return int(row["n"]) if row else 0

    def audit(
        self,
        *,
        actor: str,
        action: str,
        object_type: str,
        object_id: str | None,
        remote: str | None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        with self.auto() as tx:
            tx.run(
                "insert_audit",
                actor=actor,
                action=action,
                object_type=object_type,
                object_id=object_id,
                remote=remote,
                detail=detail or {},
            )

    def ping(self) -> bool:
        with self.auto() as tx:
            return tx.one("ping") is not None

    # -- dashboard reads ----------------------------------------------------

    def dashboard_rows(self, query: str, /, **params: Any) -> list[dict[str, Any]]:
        """Rows of one read-only `dashboard_*` block of queries.sql (dashboards/data.py)."""
        if not query.startswith("dashboard_"):
            raise ValueError(f"{query!r} is not a dashboard query")
        with self.tx() as tx:
            tx.one("dashboard_work_mem")
            return tx.all(query, **params)

    # -- artifacts and notebooks ----------------------------------------

    def add_artifact(self, run_id: int, name: str, content_type: str, data: bytes) -> None:
        """Store (or replace) one artifact of a run, bytes in Postgres."""
        with self.tx() as tx:
            tx.run(
                "upsert_artifact",
                run_id=run_id,
                name=name,
                content_type=content_type,
                size=len(data),
                data=data,
            )

    def list_artifacts(self, run_id: int) -> list[dict[str, Any]]:
        """A run's artifacts without their bytes; NotFoundError when the run does not exist."""
        with self.tx() as tx:
            if tx.one("get_run", id=run_id) is None:
                raise NotFoundError(f"run {run_id} not found")
            return tx.all("list_artifacts", run_id=run_id)

    def get_artifact(self, run_id: int, name: str) -> dict[str, Any]:
        """One artifact with its bytes; NotFoundError when the run or the artifact is missing."""
        with self.tx() as tx:
            row = tx.one("get_artifact", run_id=run_id, name=name)
        if row is None:
            raise NotFoundError(f"run {run_id} has no artifact {name!r}")
        return row

    # -- observability -------------------------------------------------------

    def metrics_snapshot(self, *, timeout: float) -> dict[str, Any]:
        """Everything /metrics reads from Postgres, in one transaction."""
        with self.tx() as tx:
            bounds = tx.one("metrics_bounds")
            return {
                "bounds": list(bounds["bounds"]) if bounds else [],
                "counters": tx.all("metrics_run_counters"),
                "queues": tx.all("metrics_queue_depth"),
                "running": tx.all("metrics_running"),
                "workers": tx.one("metrics_workers", timeout=timeout) or {},
                "dispatchers": tx.one("metrics_dispatchers", timeout=timeout) or {},
                "notifications_pending": tx.all("metrics_notifications_pending"),
            }

    def health_probe(self, *, timeout: float, wait: float) -> dict[str, Any]:
        """Dispatcher and worker liveness in one round trip; waits at most `wait` for a connection."""
        with _translated(), self.pool.connection(timeout=wait) as conn, conn.transaction():
            tx = Tx(conn)
            return {
                "workers": tx.one("metrics_workers", timeout=timeout) or {},
                "dispatchers": tx.one("metrics_dispatchers", timeout=timeout) or {},
            }

    def system_stats(self, *, timeout: float) -> dict[str, Any]:
        """Counts for /api/system/stats."""
        with self.tx() as tx:
            return {
                "tasks": tx.one("stats_tasks") or {},
                "runs": tx.all("stats_runs"),
                "workers": tx.one("stats_workers", timeout=timeout) or {},
                "queues": tx.all("metrics_queue_depth"),
            }

    def report_kernels(self, name: str, kernels: int) -> None:
        with self.tx() as tx:
            tx.run("report_kernels", name=name, kernels=kernels)

    def claim_notifications(self, *, limit: int, lease: float) -> list[dict[str, Any]]:
        with self.tx() as tx:
            return tx.all("claim_notifications", limit=limit, lease=lease)

    def notification_context(self, run_id: int, *, log_chunks: int = 4) -> dict[str, Any] | None:
        """The finished run a notification is about, its task's rule and its last log chunks."""
        with self.tx() as tx:
            row = tx.one("notification_context", run_id=run_id)
            if row is not None:
                chunks = tx.all("log_tail_chunks", run_id=run_id, chunks=log_chunks)
                row["log"] = "".join(c["data"] for c in reversed(chunks))
        return row

    def finish_notification(
        self, note_id: int, *, channel: str, status: str, event: str | None, error: str | None
    ) -> None:
        """Mark a delivery sent, skipped or failed for good, and count it."""
        with self.tx() as tx:
            if tx.run("notification_done", id=note_id, status=status, event=event, error=error):
                tx.one("count_metric", metric="notification", executor=channel, label=status)

    def retry_notification(
        self, note_id: int, *, delay: float, event: str | None, error: str
    ) -> None:
        with self.tx() as tx:
            tx.run("notification_retry", id=note_id, delay=delay, event=event, error=error)

    def notifications_of_run(self, run_id: int) -> list[dict[str, Any]]:
        with self.tx() as tx:
            return tx.all("notifications_of_run", run_id=run_id)

    def run_traceparents(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """Runs' ids, task ids and trace context, by id."""
        with self.tx() as tx:
            return {r["id"]: r for r in tx.all("run_traceparents", ids=ids)}

    def adopt_traceparent(self, run_id: int, traceparent: str) -> None:
        """Give a run that has no trace (a cron slot, a retry) the dispatcher's trace."""
        with self.tx() as tx:
            tx.run("adopt_traceparent", id=run_id, traceparent=traceparent)

    # -- security ------------------------------------------------------------

    def key_by_id(self, key_id: int) -> dict[str, Any] | None:
        """The api_keys row behind a JWT (revoked or not)."""
        with self.tx() as tx:
            return tx.one("get_api_key_by_id", id=key_id)

    def list_audit(
        self, *, limit: int, cursor: int | None = None, **filters: str | None
    ) -> list[dict[str, Any]]:
        """Audit entries, newest first, filtered by actor, action, object_type, object_id."""
        params = dict.fromkeys(("actor", "action", "object_type", "object_id")) | filters
        with self.tx() as tx:
            return tx.all("list_audit", limit=limit, cursor=cursor, **params)

    def put_task_secrets(
        self, task_id: int, *, sealed: dict[str, bytes], removed: list[str]
    ) -> None:
        """Store sealed secret values of a task and delete the `removed` names, in one go."""
        with self.tx() as tx:
            for name, value in sealed.items():
                tx.run("put_task_secret", task_id=task_id, name=name, value=value)
            if removed:
                tx.run("delete_task_secrets", task_id=task_id, names=removed)

    def task_secret_names(self, task_ids: list[int]) -> dict[int, list[str]]:
        """The secret names (never values) of each task."""
        out: dict[int, list[str]] = {i: [] for i in task_ids}
        if task_ids:
            with self.tx() as tx:
                for row in tx.all("task_secret_names", task_ids=task_ids):
                    out[row["task_id"]].append(row["name"])
        return out

    def task_secrets(self, task_id: int) -> dict[str, bytes]:
        """A task's sealed secret values (the worker opens them)."""
        with self.tx() as tx:
            return {r["name"]: bytes(r["value"]) for r in tx.all("task_secrets", task_id=task_id)}

    # -- reports -------------------------------------------------------------

    def latest_report(self, task_id: int) -> dict[str, Any]:
        """The newest succeeded run's report.html of a task; NotFoundError when there is none."""
        with self.tx() as tx:
            row = tx.one("latest_task_report", task_id=task_id)
        if row is None:
            raise NotFoundError(f"task {task_id} has no successful run with an HTML report yet")
        return row

    def prune_artifacts(self, run_id: int) -> int:
        """Apply the keep_last of the run's task; return how many artifacts were deleted."""
        with self.tx() as tx:
            return len(tx.all("prune_artifacts", run_id=run_id))

    # -- API hot path (one statement, one round trip each) ---------------------

    def get_task_view(self, ref: str | int) -> tuple[Task, list[str]]:
        """A task by numeric id or by name, with its secret names (never values)."""
        row = self._task_row(ref, "get_task_view_by_id", "get_task_view_by_name")
        return Task.from_row(row), list(row["secret_names"])

    def trigger_run(
        self,
        task: Task,
        *,
        parameters: dict[str, Any],
        audit: dict[str, Any],
        idempotency_key: str | None = None,
        traceparent: str | None = None,
    ) -> tuple[Run, bool]:
        """Queue a manual run and its audit row in one statement (one commit); the same
        idempotency key returns the same run with created=False and writes nothing."""
        with self.auto() as tx:
            row = tx.one(
                "insert_manual_run_audited",
                task_id=task.id,
                trigger="manual",
                parameters=parameters,
                queue=task.queue,
                idempotency_key=idempotency_key,
                traceparent=traceparent,
                **audit,
            )
            created = row is not None
            if row is None:
                row = tx.one(
                    "get_run_by_idempotency_key", task_id=task.id, idempotency_key=idempotency_key
                )
        assert row is not None
        return Run.from_row(row | {"task_name": task.name}), created

    def list_recent_runs(self, *, limit: int, cursor: int | None = None) -> list[Run]:
        """Runs newest first, unfiltered (a plan that stays an index walk as runs grow)."""
        with self.auto() as tx:
            rows = tx.all("list_runs_recent", limit=limit, cursor=cursor)
        return msgspec.convert(rows, list[Run])  # Run.from_row for a page, in C: ~6x faster

    def revoke_api_key_notify(self, key_id: int) -> ApiKey:
        """Revoke a key and NOTIFY nbcron_keys, so API processes drop their cached principals."""
        with self.auto() as tx:
            row = tx.one("revoke_api_key_notify", id=key_id)
        if row is None:
            raise NotFoundError(f"api key {key_id} not found")
        return ApiKey.from_row(row)


def find_cycle(graph: dict[str, list[str]], start: str) -> list[str] | None:
    """A dependency path from `start` back to itself, or None."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for upstream in graph.get(node, []):
            if upstream == start:
                return [*path, upstream]
            if upstream not in seen:
                seen.add(upstream)
                stack.append((upstream, [*path, upstream]))
    return None
