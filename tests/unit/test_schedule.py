"""service.schedule: cron slots in the task's zone, returned in UTC, across real DST changes."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from service.schedule import first_slot_after, next_slots, slots_between

BERLIN = "Europe/Berlin"
SPRING_FORWARD = date(2026, 3, 29)  # Berlin: 02:00 CET -> 03:00 CEST, 02:30 does not exist
FALL_BACK = date(2026, 10, 25)  # Berlin: 03:00 CEST -> 02:00 CET, 02:30 happens twice


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def local_days(slots: list[datetime], tz: str) -> Counter[date]:
    zone = ZoneInfo(tz)
    return Counter(s.astimezone(zone).date() for s in slots)


def assert_strictly_increasing(slots: list[datetime]) -> None:
    assert all(a < b for a, b in itertools.pairwise(slots)), slots
    assert len(set(slots)) == len(slots)


def test_first_slot_after_is_strictly_after() -> None:
    assert first_slot_after("0 * * * *", "UTC", utc(2026, 1, 1, 10, 0)) == utc(2026, 1, 1, 11)
    assert first_slot_after("0 * * * *", "UTC", utc(2026, 1, 1, 10, 0, 1)) == utc(2026, 1, 1, 11)
    assert first_slot_after("0 * * * *", "UTC", utc(2026, 1, 1, 9, 59)) == utc(2026, 1, 1, 10)


def test_first_slot_after_uses_the_task_zone_and_returns_utc() -> None:
    slot = first_slot_after("0 9 * * *", "America/New_York", utc(2026, 1, 15, 0, 0))
    assert slot == utc(2026, 1, 15, 14, 0)  # 09:00 EST
    assert slot.utcoffset() == timedelta(0)
    summer = first_slot_after("0 9 * * *", "America/New_York", utc(2026, 7, 15, 0, 0))
    assert summer == utc(2026, 7, 15, 13, 0)  # 09:00 EDT


def test_first_slot_after_accepts_aliases() -> None:
    assert first_slot_after("@daily", "UTC", utc(2026, 1, 1, 5)) == utc(2026, 1, 2)
    assert first_slot_after("@hourly", "UTC", utc(2026, 1, 1, 5, 1)) == utc(2026, 1, 1, 6)


def test_slots_between_bounds_are_inclusive() -> None:
    slots = slots_between(
        "* * * * *", "UTC", start=utc(2026, 1, 1, 10, 0), end=utc(2026, 1, 1, 10, 5), limit=100
    )
    assert slots == [utc(2026, 1, 1, 10, m) for m in range(6)]


def test_slots_between_excludes_slots_outside_the_window() -> None:
    slots = slots_between(
        "*/10 * * * *",
        "UTC",
        start=utc(2026, 1, 1, 10, 0, 1),
        end=utc(2026, 1, 1, 10, 29, 59),
        limit=100,
    )
    assert slots == [utc(2026, 1, 1, 10, 10), utc(2026, 1, 1, 10, 20)]


def test_slots_between_respects_the_limit() -> None:
    slots = slots_between("* * * * *", "UTC", start=utc(2026, 1, 1), end=utc(2026, 1, 2), limit=7)
    assert slots == [utc(2026, 1, 1, 0, m) for m in range(7)]


def test_slots_between_empty_window() -> None:
    assert (
        slots_between(
            "0 * * * *", "UTC", start=utc(2026, 1, 1, 10, 1), end=utc(2026, 1, 1, 10, 59), limit=10
        )
        == []
    )
    assert (
        slots_between("0 * * * *", "UTC", start=utc(2026, 1, 2), end=utc(2026, 1, 1), limit=10)
        == []
    )


def test_next_slots() -> None:
    slots = next_slots("30 6 * * *", "UTC", after=utc(2026, 1, 1, 6, 30), count=3)
    assert slots == [utc(2026, 1, 2, 6, 30), utc(2026, 1, 3, 6, 30), utc(2026, 1, 4, 6, 30)]
    assert next_slots("0 * * * *", "UTC", after=utc(2026, 1, 1), count=0) == []


# croniter (7.0) on the spring-forward day: the daily 02:30 local time does not exist, and
# croniter fires it once at the moment the clocks jump, 03:00 CEST (01:00 UTC). The day still
# gets exactly one run; it is neither skipped nor doubled.
SPRING_SLOT = utc(2026, 3, 29, 1, 0)


def test_daily_slot_on_spring_forward_day_runs_once() -> None:
    slots = slots_between(
        "30 2 * * *", BERLIN, start=utc(2026, 3, 26), end=utc(2026, 4, 1), limit=100
    )
    assert_strictly_increasing(slots)
    days = local_days(slots, BERLIN)
    assert sorted(days) == [date(2026, 3, d) for d in range(26, 32)]
    assert set(days.values()) == {1}
    assert SPRING_SLOT in slots
    assert utc(2026, 3, 28, 1, 30) in slots  # 02:30 CET the day before
    assert utc(2026, 3, 30, 0, 30) in slots  # 02:30 CEST the day after


def test_next_slots_on_spring_forward_day() -> None:
    slots = next_slots("30 2 * * *", BERLIN, after=utc(2026, 3, 27, 12), count=3)
    assert slots == [utc(2026, 3, 28, 1, 30), SPRING_SLOT, utc(2026, 3, 30, 0, 30)]


def test_daily_slot_on_fall_back_day_runs_once() -> None:
    # 02:30 local happens at 00:30 UTC (CEST) and again at 01:30 UTC (CET): a daily job must run
    # once that day, as cron does for fixed-time jobs.
    slots = slots_between(
        "30 2 * * *", BERLIN, start=utc(2026, 10, 22), end=utc(2026, 10, 29), limit=100
    )
    assert_strictly_increasing(slots)
    days = local_days(slots, BERLIN)
    assert sorted(days) == [date(2026, 10, d) for d in range(22, 29)]
    assert days[FALL_BACK] == 1, [s.isoformat() for s in slots]
    assert set(days.values()) == {1}


def test_next_slots_on_fall_back_day_runs_once() -> None:
    slots = next_slots("30 2 * * *", BERLIN, after=utc(2026, 10, 23, 12), count=4)
    assert_strictly_increasing(slots)
    assert set(local_days(slots, BERLIN).values()) == {1}, [s.isoformat() for s in slots]


def test_first_slot_after_the_first_fall_back_occurrence_is_the_next_day() -> None:
    # The firing loop sets next_fire_at = first_slot_after(now); right after the 02:30 CEST run
    # the next slot must be tomorrow's, not 02:30 CET one hour later.
    first = utc(2026, 10, 25, 0, 30)
    assert first_slot_after("30 2 * * *", BERLIN, first - timedelta(seconds=1)) == first
    assert first_slot_after("30 2 * * *", BERLIN, first) == utc(2026, 10, 26, 1, 30)
