"""Two years of real DST transitions, table-driven (issue: scheduling that never misses or doubles).

Semantics checked for every (zone, schedule):
- slots are strictly increasing in UTC (no loop, no instant twice);
- no local wall-clock time fires twice: a repeated (fall-back) hour or half hour fires once;
- a local time skipped by spring-forward fires once, at the first instant after the gap;
- no day is missed: a daily job fires exactly once on every local calendar day.
"""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from service.schedule import slots_between

ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]
START = datetime(2026, 1, 1, tzinfo=UTC)
END = datetime(2028, 1, 1, tzinfo=UTC)
DAYS = (END - START).days


def _slots(expr: str, zone: str) -> list[datetime]:
    return slots_between(expr, zone, start=START, end=END - timedelta(microseconds=1), limit=10**6)


def _transition_days(zone: str) -> list[date]:
    """Local dates on which the UTC offset changes."""
    tz = ZoneInfo(zone)
    days = []
    for n in range(DAYS):
        day = (START + timedelta(days=n)).date()
        noon_before = datetime(day.year, day.month, day.day, tzinfo=tz) - timedelta(hours=12)
        midnight_after = datetime(day.year, day.month, day.day, 23, 59, tzinfo=tz)
        if noon_before.utcoffset() != midnight_after.utcoffset():
            days.append(day)
    return days


def _wall(slot: datetime, zone: str) -> tuple[date, int, int]:
    local = slot.astimezone(ZoneInfo(zone))
    return (local.date(), local.hour, local.minute)


@pytest.mark.parametrize("zone", ZONES)
def test_every_zone_has_four_transitions_in_two_years(zone: str) -> None:
    assert len(_transition_days(zone)) == 4


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("expr", ["30 2 * * *", "0 * * * *", "*/30 * * * *"])
def test_strictly_increasing_and_no_wall_time_twice(zone: str, expr: str) -> None:
    slots = _slots(expr, zone)
    assert all(a < b for a, b in itertools.pairwise(slots))
    walls = Counter(_wall(s, zone) for s in slots)
    assert max(walls.values()) == 1, [w for w, n in walls.items() if n > 1][:3]


@pytest.mark.parametrize("zone", ZONES)
def test_daily_job_fires_exactly_once_every_local_day(zone: str) -> None:
    tz = ZoneInfo(zone)
    per_day = Counter(s.astimezone(tz).date() for s in _slots("30 2 * * *", zone))
    first, last = START.astimezone(tz).date(), END.astimezone(tz).date()
    inner = {first + timedelta(days=n) for n in range(1, (last - first).days)}
    assert inner <= set(per_day), sorted(inner - set(per_day))[:3]  # no missed day
    assert set(per_day.values()) == {1}  # never twice


@pytest.mark.parametrize("zone", ZONES)
def test_skipped_local_time_fires_once_right_after_the_gap(zone: str) -> None:
    tz = ZoneInfo(zone)
    slots = _slots("30 2 * * *", zone)
    for day in _transition_days(zone):
        fired = [s.astimezone(tz) for s in slots if s.astimezone(tz).date() == day]
        assert len(fired) == 1, (day, fired)
        local = fired[0]
        if (local.hour, local.minute) != (2, 30):
            # 02:30 did not exist that day: the slot fires at the first instant after the gap
            just_before = local - timedelta(minutes=1)
            assert just_before.utcoffset() != local.utcoffset() or local.minute == 0, local


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize(("expr", "per_hour"), [("0 * * * *", 1), ("*/30 * * * *", 2)])
def test_sub_daily_jobs_have_no_gap_beyond_the_dst_shift(
    zone: str, expr: str, per_hour: int
) -> None:
    slots = _slots(expr, zone)
    step = timedelta(minutes=60 // per_hour)
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert min(gaps) > timedelta(0)
    # the only longer gaps are where a repeated hour (or half hour) was not run again
    assert max(gaps) <= step + timedelta(hours=1)
    assert sum(1 for g in gaps if g != step) <= 4 * 2
