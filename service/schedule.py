"""Cron arithmetic: slots of a schedule in its own time zone, stored and compared in UTC.

DST: a local time that does not exist (spring forward) fires once, at the first instant after
the gap (croniter's behaviour). A local time that happens twice (fall back) fires once, on its
first occurrence: a repeated hour is not run again, whatever the schedule.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from croniter import croniter

_EPSILON = timedelta(microseconds=1)


def iter_slots(schedule: str, timezone: str, after: datetime) -> Iterator[datetime]:
    """Fire times strictly after `after`, in UTC, strictly increasing, DST-safe."""
    zone = ZoneInfo(timezone)
    it = croniter(schedule, after.astimezone(zone))
    last = after.astimezone(UTC)
    while True:
        slot = it.get_next(datetime).astimezone(UTC)
        if slot <= last:
            continue
        if slot.astimezone(zone).fold == 1:  # the second pass through a repeated local time
            continue
        last = slot
        yield slot


def first_slot_after(schedule: str, timezone: str, after: datetime) -> datetime:
    """The first fire time strictly after `after`, in UTC."""
    return next(iter_slots(schedule, timezone, after))


def slots_between(
    schedule: str, timezone: str, *, start: datetime, end: datetime, limit: int
) -> list[datetime]:
    """Fire times from `start` (inclusive) to `end` (inclusive), at most `limit`, in UTC."""
    slots: list[datetime] = []
    for slot in iter_slots(schedule, timezone, start - _EPSILON):
        if slot > end or len(slots) >= limit:
            break
        slots.append(slot)
    return slots


@lru_cache(maxsize=4096)
def slots_until(
    schedule: str, timezone: str, *, start: datetime, end: datetime, limit: int
) -> tuple[tuple[datetime, ...], datetime | None]:
    """The slots from `start` (inclusive) to `end` (inclusive), at most `limit`, and the first slot
    after `end` (None when the limit cut the window short). One pass of one iterator.

    Cached: the tasks of a herd (same schedule, same due slot, one tick's `end`) cost one
    computation between them.
    """
    slots: list[datetime] = []
    for slot in iter_slots(schedule, timezone, start - _EPSILON):
        if slot > end:
            return tuple(slots), slot
        if len(slots) >= limit:
            return tuple(slots), None
        slots.append(slot)
    raise AssertionError("a cron schedule has no end")  # pragma: no cover


def next_slots(schedule: str, timezone: str, *, after: datetime, count: int) -> list[datetime]:
    """The next `count` fire times after `after`, in UTC."""
    it = iter_slots(schedule, timezone, after)
    return [next(it) for _ in range(count)]
