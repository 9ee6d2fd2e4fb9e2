"""Cron arithmetic: slots of a schedule in its own time zone, stored and compared in UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

_EPSILON = timedelta(microseconds=1)


def _iter(schedule: str, timezone: str, after: datetime) -> croniter:
    return croniter(schedule, after.astimezone(ZoneInfo(timezone)))


def first_slot_after(schedule: str, timezone: str, after: datetime) -> datetime:
    """The first fire time strictly after `after`, in UTC."""
    return _iter(schedule, timezone, after).get_next(datetime).astimezone(UTC)


def slots_between(
    schedule: str, timezone: str, *, start: datetime, end: datetime, limit: int
) -> list[datetime]:
    """Fire times from `start` (inclusive) to `end` (inclusive), at most `limit`, in UTC."""
    slots: list[datetime] = []
    it = _iter(schedule, timezone, start - _EPSILON)
    while len(slots) < limit:
        slot = it.get_next(datetime).astimezone(UTC)
        if slot > end:
            break
        if not slots or slot > slots[-1]:  # never the same instant twice (DST fall-back)
            slots.append(slot)
    return slots


def next_slots(schedule: str, timezone: str, *, after: datetime, count: int) -> list[datetime]:
    """The next `count` fire times after `after`, in UTC."""
    it = _iter(schedule, timezone, after)
    out: list[datetime] = []
    while len(out) < count:
        slot = it.get_next(datetime).astimezone(UTC)
        if not out or slot > out[-1]:
            out.append(slot)
    return out
