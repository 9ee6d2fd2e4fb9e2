"""The worker: a Dramatiq worker whose one actor claims a run, executes it and records the result.

Cross-cutting behaviour (registration, heartbeats, cancel polling, log flushing, shutdown) lives in
the `WorkerMonitor` middleware; the actor itself stays a short claim → execute → finish.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import dramatiq
from dramatiq.middleware import Middleware

from executors import (
    Outcome,
    Result,
    RunContext,
    SpecError,
    UnknownExecutorError,
    get_executor,
    start_executors,
    stop_executors,
)
from service.batching import Combiner
from service.broker import declare_execute_run, make_broker
from service.config import Settings
from service.errors import NbcronError, UnavailableError
from service.lifecycle import retry_delay
from service.logging import run_context
from service.metrics import kernel_pool_ready
from service.models import RunResult
from service.notify import Notifier
from service.secrets import Masker, SecretsError, load_task_secrets
from service.store import Store
from service.tasks import executor_config
from service.tracing import annotate, run_span

log = logging.getLogger("nbcron.worker")
TRUNCATION_MARKER = "\n[nbcron] output truncated: the log reached its limit of {limit} bytes\n"
SHUTDOWN_ERROR = "worker shut down during the run"
_DB_RETRY_SECONDS = 60.0
_T = TypeVar("_T")


class RunLog:
    """Buffers executor output and writes it to run_logs in chunks, capped at `max_bytes`."""

    def __init__(self, store: Store, run_id: int, *, max_bytes: int, flush_bytes: int = 65536):
        self.store, self.run_id = store, run_id
        self.max_bytes, self.flush_bytes = max_bytes, flush_bytes
        self._lock = threading.Lock()
        self._buf: list[str] = []
        self._buffered = 0
        self._written = 0
        self._seq = 0
        self.truncated = False

    def write(self, text: str) -> None:
        """Add output; past the cap, write the truncation marker once and drop the rest."""
        with self._lock:
            if self.truncated or not text:
                return
            room = self.max_bytes - self._written - self._buffered
            data = text.encode()
            if len(data) > room:
                text = data[: max(room, 0)].decode(errors="ignore")
                text += TRUNCATION_MARKER.format(limit=self.max_bytes)
                self.truncated = True
            self._buf.append(text)
            self._buffered += len(data)
            if self._buffered >= self.flush_bytes or self.truncated:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._buf:
            return
        data = "".join(self._buf)
        try:
            self.store.append_log(self.run_id, self._seq, data)
        except NbcronError as exc:  # keep the output; the next flush tries again
            log.warning("run %s: log flush failed: %s", self.run_id, exc)
            return
        self._seq += 1
        self._written += self._buffered
        self._buf, self._buffered = [], 0


@dataclass
class ActiveRun:
    """A run this worker process is executing now."""

    run_id: int
    log: RunLog
    cancel: threading.Event = field(default_factory=threading.Event)
    shutdown: bool = False
    mask: Masker = field(default_factory=Masker)  # the task's secret values, shown as ***
    artifacts: int = 0  # stored so far; a run that stored some prunes by its task's keep_last


class WorkerMonitor(Middleware):
    """Registers the worker, heartbeats it and its runs, relays cancels, flushes logs."""

    def __init__(self, store: Store, settings: Settings, name: str) -> None:
        self.store, self.settings, self.name = store, settings, name
        self.active: dict[int, ActiveRun] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def track(self, run: ActiveRun) -> None:
        with self._lock:
            self.active[run.run_id] = run

    def untrack(self, run_id: int) -> None:
        with self._lock:
            self.active.pop(run_id, None)

    def snapshot(self) -> list[ActiveRun]:
        with self._lock:
            return list(self.active.values())

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Before any worker thread can take a message: runs start with the executors ready
        (the shell executor's guardian in place; kernels warm in the background)."""
        start_executors(executor_config(self.settings))

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self._beat()
        self._thread = threading.Thread(target=self._loop, name="nbcron-monitor", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Stop running work so every run ends in a terminal state before the process exits."""
        for run in self.snapshot():
            run.shutdown = True
            run.cancel.set()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        stop_executors()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.store.stop_worker(self.name)
        except NbcronError as exc:
            log.warning("could not record worker stop: %s", exc)

    def _loop(self) -> None:
        last_beat = time.monotonic()
        while not self._stop.wait(0.5):
            self._flush_logs()
            self._relay_cancels()
            if time.monotonic() - last_beat >= self.settings.heartbeat_interval_seconds:
                self._beat()
                last_beat = time.monotonic()

    def _flush_logs(self) -> None:
        for run in self.snapshot():
            run.log.flush()

    def _relay_cancels(self) -> None:
        runs = {r.run_id: r for r in self.snapshot()}
        if not runs:
            return
        try:
            for run_id in self.store.cancel_flags(list(runs)):
                runs[run_id].cancel.set()
        except NbcronError as exc:
            log.warning("cancel poll failed: %s", exc)

    def _beat(self) -> None:
        try:
            self.store.heartbeat_worker(
                name=self.name,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                queues=list(self.settings.worker_queues),
                threads=self.settings.worker_threads,
                running=[r.run_id for r in self.snapshot()],
            )
            kernels = kernel_pool_ready(getattr(self.settings, "kernel_pool_kernels", ()))
            if kernels is not None:
                self.store.report_kernels(self.name, kernels)
        except NbcronError as exc:
            log.warning("heartbeat failed: %s", exc)


class RunHandler:
    """The body of the execute_run actor: claim, execute, finish."""

    __name__ = "execute_run"

    def __init__(self, store: Store, monitor: WorkerMonitor, settings: Settings) -> None:
        self.store, self.monitor, self.settings = store, monitor, settings
        self.config = executor_config(settings)
        self.on_finished: Callable[[int], None] = lambda run_id: None  # wakes the notifier
        # The process's threads share their claim and finish statements (one per batch).
        self._claims: Combiner[int, dict[str, Any] | None] = Combiner(self._claim_batch)
        self._finishes: Combiner[RunResult, None] = Combiner(self._finish_batch)

    def __call__(self, run_id: int) -> None:
        claim = self._claim(run_id)
        if claim is None:
            return  # already claimed, cancelled or gone: a duplicate delivery is a no-op
        run = ActiveRun(
            run_id=run_id, log=RunLog(self.store, run_id, max_bytes=self.settings.log_max_bytes)
        )
        self.monitor.track(run)
        bound = run_context(run_id=run_id, task_id=claim["task_id"], worker=self.monitor.name)
        try:
            with bound, run_span(self.store, claim):
                result = self._execute(claim, run)
                annotate(**{"nbcron.outcome": result.outcome.value})
                run.log.flush()
                self._finish(claim, run, result)
                self._prune(run)
                log.info("run %s %s", run_id, result.outcome.value)
        finally:
            self.monitor.untrack(run_id)
            if claim["has_notify"]:  # others are found by the notifier's own poll
                self.on_finished(run_id)

    def _claim(self, run_id: int) -> dict[str, Any] | None:
        """Claim the run; while Postgres is away keep trying (the claim is idempotent) rather
        than drop the message and leave the run to the slow re-send."""
        return _while_unavailable(lambda: self._claims(run_id), what=f"run {run_id}")

    def _claim_batch(self, run_ids: Sequence[int]) -> list[dict[str, Any] | None]:
        """One claim statement for the batch. A run id twice in one batch (a re-sent message
        arriving with the first) is claimed once: only its first caller gets the row."""
        claimed = self.store.claim_runs(run_ids, worker=self.monitor.name)
        return [claimed.pop(run_id, None) for run_id in run_ids]

    def _finish_batch(self, results: Sequence[RunResult]) -> list[None]:
        self.store.finish_runs(results)
        return [None] * len(results)

    def _execute(self, claim: dict[str, Any], run: ActiveRun) -> Result:
        try:
            executor = get_executor(claim["executor"])
            spec = executor.parse_spec(claim["spec"])
        except (UnknownExecutorError, SpecError) as exc:
            return Result(outcome=Outcome.FAILED, error=f"cannot run this task: {exc}")
        try:
            secrets = (
                load_task_secrets(self.store, self.settings, claim["task_id"])
                if claim["has_secrets"]
                else {}
            )
        except (SecretsError, NbcronError) as exc:  # the run still ends, failed, and may retry
            return Result(outcome=Outcome.FAILED, error=f"cannot run this task: {exc.detail}")
        run.mask = Masker(secrets.values())
        sink = run.mask.stream(run.log.write)
        ctx = RunContext(
            run_id=run.run_id,
            task_name=claim["task_name"],
            parameters=claim["parameters"],
            env={**claim["env"], **secrets},
            timeout_seconds=claim["timeout_seconds"],
            cancel_event=run.cancel,
            log=sink.write,
            add_artifact=lambda n, t, d: self._add_artifact(run, n, t, d),
            config=self.config,
        )
        try:
            return executor.run(spec, ctx)
        finally:
            sink.close()  # release output held back while it might have been a secret's start

    def _add_artifact(self, run: ActiveRun, name: str, content_type: str, data: bytes) -> None:
        self.store.add_artifact(
            run.run_id, name, content_type, run.mask.mask_bytes(content_type, data)
        )
        run.artifacts += 1

    def _prune(self, run: ActiveRun) -> None:
        """Drop old artifacts beyond the task's keep_last; the run's result is already saved."""
        if not run.artifacts:
            return
        try:
            self.store.prune_artifacts(run.run_id)
        except NbcronError as exc:  # the next run of the task prunes again
            log.warning("run %s: artifact pruning failed: %s", run.run_id, exc)

    def _finish(self, claim: dict[str, Any], run: ActiveRun, result: Result) -> None:
        status, error = result.outcome.value, run.mask.mask_error(result.error)
        if run.shutdown and result.outcome is Outcome.CANCELLED:
            status, error = Outcome.FAILED.value, SHUTDOWN_ERROR
        delay = retry_delay(
            status=status,
            attempt=claim["attempt"],
            max_retries=claim["max_retries"],
            base=claim["retry_delay_seconds"],
        )
        outcome = RunResult(
            run_id=run.run_id, status=status, exit_code=result.exit_code, error=error
        )
        # keep trying while Postgres is away; past the limit the reaper ends the run
        _while_unavailable(
            lambda: self._record(outcome, delay, has_dependents=claim["has_dependents"]),
            what=f"run {run.run_id}'s result",
            give_up=True,
        )

    def _record(self, outcome: RunResult, delay: float | None, *, has_dependents: bool) -> None:
        """A plain result shares a statement with other threads' results; a retry to queue or
        dependents to release take their own transaction."""
        if delay is None and not has_dependents:
            self._finishes(outcome)
        else:
            self.store.finish_run(outcome, retry_delay=delay, has_dependents=has_dependents)


def _while_unavailable(call: Callable[[], _T], *, what: str, give_up: bool = False) -> _T | None:
    """Retry `call` while the database is unreachable, for up to a minute.

    Past that: None when `give_up` (the reaper ends the run later), else the error propagates
    (the message is dropped and the dispatcher re-sends the run).
    """
    deadline = time.monotonic() + _DB_RETRY_SECONDS
    while True:
        try:
            return call()
        except UnavailableError as exc:
            if time.monotonic() > deadline:
                log.error("%s: database unavailable for %ss: %s", what, _DB_RETRY_SECONDS, exc)
                if give_up:
                    return None
                raise
            time.sleep(1.0)


def worker_name(settings: Settings) -> str:
    return settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"


def run_worker(settings: Settings, *, stop: threading.Event | None = None) -> None:
    """Run one worker process until SIGINT/SIGTERM (or `stop` is set)."""
    from service.bootstrap import require_database_url

    stop = stop or _stop_on_signals()
    threads = settings.worker_threads
    # claims and results share statements, so a few connections serve many threads
    store = Store(require_database_url(settings), min_size=1, max_size=min(threads, 8) + 2).open()
    monitor = WorkerMonitor(store, settings, worker_name(settings))
    broker = make_broker(settings, extra=[monitor])
    handler = RunHandler(store, monitor, settings)
    notifier = Notifier(store, settings).start()
    handler.on_finished = notifier.wake
    declare_execute_run(broker, handler, settings.worker_queues)
    worker = dramatiq.Worker(
        broker,
        queues=set(settings.worker_queues),
        worker_threads=threads,
        worker_timeout=settings.consumer_wait_ms,
    )
    # Dramatiq's consumer backs off (up to worker_timeout) whenever its prefetch is all in flight;
    # a deep prefetch keeps every thread fed between acks.
    worker.queue_prefetch = settings.worker_prefetch or 4 * threads
    worker.start()
    log.info("worker %s consuming %s", monitor.name, ",".join(settings.worker_queues))
    stop.wait()
    worker.stop(timeout=30_000)
    notifier.stop()
    broker.close()
    store.close()


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop
