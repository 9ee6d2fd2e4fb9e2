"""When a wake-up of the dispatcher looks at the cron schedule, and when it can skip it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import service.dispatcher as dispatcher_module
from service.config import Settings
from service.dispatcher import Dispatcher


@dataclass
class FakeStore:
    """Only what a tick and `seconds_to_next` ask of the store; no runs are due."""

    fire_at: datetime | None
    fired: list[datetime] = field(default_factory=list)

    def claim_dispatch(self, **_: Any) -> list[dict[str, Any]]:
        return []

    def next_work_at(self) -> tuple[datetime | None, datetime | None]:
        return None, self.fire_at

    def dispatcher_heartbeat(self, name: str) -> None: ...

    def reap_lost_runs(self, **_: Any) -> list[dict[str, Any]]:
        return []


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> FakeStore:
    fake = FakeStore(fire_at=datetime.now(UTC) + timedelta(minutes=5))
    monkeypatch.setattr(
        dispatcher_module, "fire_due_tasks", lambda store, *, now: store.fired.append(now)
    )
    return fake


def dispatcher(store: FakeStore, poll: float = 60.0) -> Dispatcher:
    settings = Settings(poll_interval_seconds=poll, heartbeat_interval_seconds=3600)
    return Dispatcher(store, broker=None, settings=settings)  # type: ignore[arg-type]


def test_the_first_tick_looks_at_the_schedule(store: FakeStore) -> None:
    dispatcher(store).tick()
    assert len(store.fired) == 1


def test_a_wake_up_before_the_next_slot_skips_the_cron_query(store: FakeStore) -> None:
    d = dispatcher(store)
    d.tick()
    d.seconds_to_next()  # reads the slot five minutes ahead
    d.tick()
    d.tick()
    assert len(store.fired) == 1


def test_a_task_write_makes_the_next_tick_look_again(store: FakeStore) -> None:
    d = dispatcher(store)
    d.tick()
    d.seconds_to_next()
    d.tasks_changed()
    d.tick()
    assert len(store.fired) == 2


def test_a_slot_that_came_due_is_fired(store: FakeStore) -> None:
    d = dispatcher(store)
    d.tick()
    store.fire_at = datetime.now(UTC) - timedelta(seconds=1)
    d.seconds_to_next()
    d.tick()
    assert len(store.fired) == 2


def test_a_reading_older_than_a_poll_is_not_trusted(store: FakeStore) -> None:
    d = dispatcher(store, poll=0.0)
    d.tick()
    d.seconds_to_next()
    d.tick()
    assert len(store.fired) == 2


def test_the_sleep_ends_at_the_next_slot(store: FakeStore) -> None:
    store.fire_at = datetime.now(UTC) + timedelta(seconds=2)
    wait = dispatcher(store).seconds_to_next()
    assert 1.5 < wait <= 2.0
