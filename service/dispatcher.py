"""The dispatcher: fires cron slots, sends due queued runs to the broker, reaps lost runs.

It wakes on `NOTIFY nbcron_runs` (sent by triggers on every insert into runs, payload '', and on
every task write, payload 'tasks') or after a short poll. All claims are SQL (`FOR UPDATE SKIP
LOCKED`, unique slots), so several dispatchers may run at once and each firing and each send still
happens once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

import dramatiq

from service.broker import make_broker, send_run
from service.config import Settings
from service.errors import NbcronError
from service.firing import fire_due_tasks
from service.store import Listener, Store
from service.tracing import dispatch_spans

log = logging.getLogger("nbcron.dispatcher")
CHANNEL = "nbcron_runs"
TASKS_CHANGED = "tasks"  # the payload of a task write (migration 0006)


class Dispatcher:
    """One dispatcher process's loop; `tick` does one round of work."""

    def __init__(self, store: Store, broker: dramatiq.Broker, settings: Settings) -> None:
        self.store, self.broker, self.settings = store, broker, settings
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        self._last_beat = 0.0
        self._broker_backoff = 0.0
        self._retry_broker_at = 0.0
        # The next cron slot as last read, and when (monotonic); None: look at the tasks.
        self._fire_at: datetime | None = None
        self._fire_read_at: float | None = None

    def tick(self) -> int:
        """Fire due cron slots, send due runs, reap lost ones; return how many runs were sent."""
        now = datetime.now(UTC)
        if self._cron_may_be_due(now):
            fire_due_tasks(self.store, now=now)
        sent = self.send_due()
        self._housekeeping()
        return sent

    def tasks_changed(self) -> None:
        """A task was written (or the listener was lost): the next tick looks at the tasks."""
        self._fire_read_at = None

    def _cron_may_be_due(self, now: datetime) -> bool:
        """False only while the slot last read is still ahead, that reading is fresher than a
        poll, and no task was written since: a wake-up for a queued run then costs no cron
        query."""
        read_at = self._fire_read_at
        if read_at is None or time.monotonic() - read_at >= self.settings.poll_interval_seconds:
            return True
        return self._fire_at is not None and self._fire_at <= now

    def send_due(self) -> int:
        """Claim due runs in batches and put their ids on the broker."""
        total = 0
        while not self.broker_down():
            claimed = self.store.claim_dispatch(
                limit=self.settings.dispatch_batch,
                redispatch_after=self.settings.redispatch_after_seconds,
            )
            with dispatch_spans(self.store, claimed):
                total += self._send(claimed)
            if len(claimed) < self.settings.dispatch_batch:
                break
        return total

    def broker_down(self) -> bool:
        """True while backing off after a failed send."""
        return time.monotonic() < self._retry_broker_at

    def _send(self, claimed: list[dict[str, Any]]) -> int:
        for index, row in enumerate(claimed):
            try:
                send_run(self.broker, row["id"], queue=row["queue"])
            except Exception as exc:  # broker down: give the rest back, they go out later
                self.store.undo_dispatch([r["id"] for r in claimed[index:]])
                self._broker_failed(exc, waiting=len(claimed) - index)
                return index
        if self._broker_backoff:
            log.info("broker is reachable again")
            self._broker_backoff = 0.0
        return len(claimed)

    def _broker_failed(self, exc: Exception, *, waiting: int) -> None:
        """Back off exponentially (to 5 s), so an outage costs at most one attempt per backoff."""
        self._broker_backoff = min(5.0, max(0.25, self._broker_backoff * 2))
        self._retry_broker_at = time.monotonic() + self._broker_backoff
        log.warning(
            "broker unavailable, %d run(s) wait, next try in %.2fs: %s",
            waiting,
            self._broker_backoff,
            exc,
        )

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_beat < self.settings.heartbeat_interval_seconds:
            return
        self._last_beat = now
        self.store.dispatcher_heartbeat(self.name)
        for row in self.store.reap_lost_runs(timeout=self.settings.heartbeat_timeout_seconds):
            log.warning("run %s: worker %s lost", row["id"], row["worker"])

    def seconds_to_next(self) -> float:
        """How long the loop may sleep: until the next due run or cron slot, at most one poll."""
        wait = self.settings.poll_interval_seconds
        if self.broker_down():  # due runs wait for the broker, not for a busy loop
            return min(wait, self._retry_broker_at - time.monotonic())
        read_at = time.monotonic()
        pending_at, fire_at = self.store.next_work_at()
        self._fire_at, self._fire_read_at = fire_at, read_at
        now = datetime.now(UTC)
        for at in (pending_at, fire_at):
            if at is not None:
                wait = min(wait, max(0.0, (at - now).total_seconds()))
        return wait


def run_loop(dispatcher: Dispatcher, stop: threading.Event) -> None:
    """Tick, then sleep until a NOTIFY, the next due time or a poll; survive Postgres restarts."""
    listener: Listener | None = None
    while not stop.is_set():
        try:
            if listener is None:
                listener = dispatcher.store.listener(CHANNEL)
                dispatcher.tasks_changed()  # what was written while no one listened
            dispatcher.tick()
            wait = dispatcher.seconds_to_next()
            if wait > 0 and not stop.is_set() and TASKS_CHANGED in listener.wait(min(wait, 1.0)):
                dispatcher.tasks_changed()
        except NbcronError as exc:
            log.warning("dispatcher: %s; retrying", exc)
            if listener is not None:
                listener.close()
            listener = None
            stop.wait(1.0)
    if listener is not None:
        listener.close()


def run_dispatcher(settings: Settings, *, stop: threading.Event | None = None) -> None:
    """Run one dispatcher process until SIGINT/SIGTERM (or `stop` is set)."""
    from service.bootstrap import require_database_url

    if stop is None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    store = Store(require_database_url(settings), min_size=1, max_size=3).open(wait=False)
    broker = make_broker(settings)
    log.info("dispatcher started")
    try:
        run_loop(Dispatcher(store, broker, settings), stop)
    finally:
        broker.close()
        store.close()
