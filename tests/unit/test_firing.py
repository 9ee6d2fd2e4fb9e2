"""service.firing.plan_firing: misfire and overlap policies after an outage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from service.firing import MAX_SLOTS_PER_TICK, FirePlan, plan_firing
from service.models import Task
from tests.support import task_record

T0 = datetime(2026, 5, 4, 8, 0, tzinfo=UTC)  # the slot due when the outage began
NOW = T0 + timedelta(hours=2, seconds=30)  # back after two hours
ALL_SLOTS = [T0 + timedelta(minutes=m) for m in range(121)]  # T0 .. T0+120min, inclusive
LATEST = ALL_SLOTS[-1]  # 30 s ago: within the 60 s grace, on time
LATE = ALL_SLOTS[:-1]  # 120 slots more than 60 s old


def make_task(**overrides: Any) -> Task:
    base = {
        "name": "every-minute",
        "schedule": "* * * * *",
        "next_fire_at": T0,
        "created_at": T0 - timedelta(days=1),
        "updated_at": T0 - timedelta(days=1),
    }
    return task_record(**(base | overrides))


def missed_slots(plan: FirePlan) -> list[datetime]:
    return [slot for slot, _ in plan.missed]


def assert_partition(plan: FirePlan, slots: list[datetime]) -> None:
    """Every slot considered is either run or missed, never both, never twice."""
    run, missed = plan.run_slots, missed_slots(plan)
    assert not set(run) & set(missed)
    assert sorted(run + missed) == slots
    assert all(reason for _, reason in plan.missed)


def test_skip_runs_only_on_time_slots() -> None:
    plan = plan_firing(make_task(misfire_policy="skip"), NOW, active=False)
    assert plan.run_slots == [LATEST]
    assert missed_slots(plan) == LATE
    assert all("skip" in reason for _, reason in plan.missed)
    assert_partition(plan, ALL_SLOTS)
    assert not plan.cancel_active


def test_skip_with_no_on_time_slot_runs_nothing() -> None:
    # With a 10 s grace the latest slot, 30 s old, is late too.
    plan = plan_firing(
        make_task(misfire_policy="skip", misfire_grace_seconds=10), NOW, active=False
    )
    assert plan.run_slots == []
    assert missed_slots(plan) == ALL_SLOTS


def test_run_once_coalesces_into_the_latest_slot() -> None:
    plan = plan_firing(make_task(misfire_policy="run_once"), NOW, active=False)
    assert plan.run_slots == [LATEST]
    assert missed_slots(plan) == LATE
    assert all("run_once" in reason for _, reason in plan.missed)
    assert_partition(plan, ALL_SLOTS)


def test_run_once_runs_the_latest_even_when_it_is_late() -> None:
    task = make_task(misfire_policy="run_once", misfire_grace_seconds=10)  # every slot late
    plan = plan_firing(task, NOW, active=False)
    assert plan.run_slots == [LATEST]
    assert len(plan.missed) == len(ALL_SLOTS) - 1


def test_run_all_is_bounded_by_max_catchup() -> None:
    plan = plan_firing(make_task(misfire_policy="run_all", max_catchup=10), NOW, active=False)
    assert plan.run_slots == [*LATE[-10:], LATEST]
    assert missed_slots(plan) == LATE[:-10]
    assert all("max_catchup" in reason for _, reason in plan.missed)
    assert_partition(plan, ALL_SLOTS)


def test_run_all_with_room_runs_everything() -> None:
    plan = plan_firing(make_task(misfire_policy="run_all", max_catchup=1000), NOW, active=False)
    assert plan.run_slots == ALL_SLOTS
    assert plan.missed == []


@pytest.mark.parametrize("policy", ["skip", "run_once", "run_all"])
def test_next_fire_at_is_the_first_slot_after_now(policy: str) -> None:
    plan = plan_firing(make_task(misfire_policy=policy), NOW, active=False)
    assert plan.next_fire_at is not None
    assert plan.next_fire_at > NOW
    assert plan.next_fire_at == LATEST + timedelta(minutes=1)


def test_on_time_tick_runs_the_one_due_slot() -> None:
    task = make_task(next_fire_at=T0, misfire_policy="skip")
    plan = plan_firing(task, T0 + timedelta(seconds=2), active=False)
    assert plan.run_slots == [T0]
    assert plan.missed == []
    assert plan.next_fire_at == T0 + timedelta(minutes=1)


@pytest.mark.parametrize("policy", ["skip", "run_once", "run_all"])
def test_at_most_max_slots_per_tick_are_considered(policy: str) -> None:
    now = T0 + timedelta(days=3)  # 4321 per-minute slots
    plan = plan_firing(make_task(misfire_policy=policy), now, active=False)
    considered = plan.run_slots + missed_slots(plan)
    assert len(considered) == MAX_SLOTS_PER_TICK
    assert len(set(considered)) == MAX_SLOTS_PER_TICK
    # The next tick carries on right after the last slot looked at, so none is lost.
    assert plan.next_fire_at == max(considered) + timedelta(minutes=1)


def run_ticks(task: Task, now: datetime) -> tuple[list[datetime], list[datetime]]:
    """Plan repeatedly, as the store does while the task stays due; return (runs, missed)."""
    runs: list[datetime] = []
    missed: list[datetime] = []
    for _ in range(100):
        plan = plan_firing(task, now, active=False)
        runs += plan.run_slots
        missed += missed_slots(plan)
        assert plan.next_fire_at is not None
        task = msgspec.structs.replace(task, next_fire_at=plan.next_fire_at)
        if plan.next_fire_at > now:
            return runs, missed
    raise AssertionError("the task never caught up")


LONG_NOW = T0 + timedelta(days=3, seconds=30)
LONG_SLOTS = [T0 + timedelta(minutes=m) for m in range(3 * 24 * 60 + 1)]


def test_long_outage_every_slot_accounted_once() -> None:
    runs, missed = run_ticks(make_task(misfire_policy="skip"), LONG_NOW)
    assert runs == [LONG_SLOTS[-1]]
    assert sorted(runs + missed) == LONG_SLOTS


def test_long_outage_run_once_runs_once_overall() -> None:
    # run_once means one run for all late slots, however many ticks it takes to walk them.
    runs, missed = run_ticks(make_task(misfire_policy="run_once"), LONG_NOW)
    assert runs == [LONG_SLOTS[-1]]
    assert sorted(runs + missed) == LONG_SLOTS


def test_long_outage_run_all_respects_max_catchup_overall() -> None:
    runs, missed = run_ticks(make_task(misfire_policy="run_all", max_catchup=10), LONG_NOW)
    assert runs == LONG_SLOTS[-11:]  # the latest 10 late ones plus the on-time one
    assert sorted(runs + missed) == LONG_SLOTS


# Overlap: one on-time slot, a run of the task still active.
ON_TIME_NOW = T0 + timedelta(seconds=5)


def test_forbid_with_an_active_run_misses_the_slot() -> None:
    task = make_task(overlap_policy="forbid")
    plan = plan_firing(task, ON_TIME_NOW, active=True)
    assert plan.run_slots == []
    assert plan.missed == [(T0, plan.missed[0][1])]
    assert "overlap" in plan.missed[0][1]
    assert not plan.cancel_active
    assert plan.next_fire_at == T0 + timedelta(minutes=1)


def test_forbid_after_outage_keeps_misfire_reasons() -> None:
    plan = plan_firing(make_task(overlap_policy="forbid", misfire_policy="skip"), NOW, active=True)
    assert plan.run_slots == []
    assert_partition(plan, ALL_SLOTS)
    reasons = dict(plan.missed)
    assert "overlap" in reasons[LATEST]
    assert all("skip" in reasons[s] for s in LATE)


def test_forbid_without_an_active_run_is_unaffected() -> None:
    plan = plan_firing(make_task(overlap_policy="forbid"), ON_TIME_NOW, active=False)
    assert plan.run_slots == [T0]
    assert plan.missed == []


def test_replace_with_an_active_run_cancels_it() -> None:
    plan = plan_firing(make_task(overlap_policy="replace"), ON_TIME_NOW, active=True)
    assert plan.run_slots == [T0]
    assert plan.cancel_active
    assert plan.missed == []


def test_replace_after_outage_keeps_one_run() -> None:
    task = make_task(overlap_policy="replace", misfire_policy="run_all", max_catchup=10)
    plan = plan_firing(task, NOW, active=True)
    assert plan.run_slots == [LATEST]
    assert plan.cancel_active


def test_replace_without_an_active_run_does_not_cancel() -> None:
    plan = plan_firing(make_task(overlap_policy="replace"), ON_TIME_NOW, active=False)
    assert plan.run_slots == [T0]
    assert not plan.cancel_active


def test_allow_is_unaffected_by_an_active_run() -> None:
    task = make_task(overlap_policy="allow", misfire_policy="run_all", max_catchup=10)
    assert plan_firing(task, NOW, active=True) == plan_firing(task, NOW, active=False)
    plan = plan_firing(task, NOW, active=True)
    assert len(plan.run_slots) == 11
    assert not plan.cancel_active
