"""Cron firing: which slots of a due task run, which are recorded as missed, and the next slot.

The plan is pure (unit-tested); the store applies it in one transaction per batch of due tasks,
with the unique (task_id, scheduled_for) index making every slot fire once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from service.models import MisfirePolicy, OverlapPolicy, Task
from service.schedule import first_slot_after, slots_until
from service.store import Store

MAX_SLOTS_PER_TICK = 1000  # bound on slots looked at for one task in one tick


@dataclass(frozen=True, kw_only=True)
class FirePlan:
    """What one tick does for one due task."""

    run_slots: list[datetime] = field(default_factory=list)
    missed: list[tuple[datetime, str]] = field(default_factory=list)
    cancel_active: bool = False
    next_fire_at: datetime | None = None


def _by_misfire(task: Task, slots: list[datetime], now: datetime) -> FirePlan:
    grace = timedelta(seconds=task.misfire_grace_seconds)
    late = [s for s in slots if now - s > grace]
    on_time = [s for s in slots if now - s <= grace]
    policy = MisfirePolicy(task.misfire_policy)
    if policy is MisfirePolicy.SKIP:
        return FirePlan(run_slots=on_time, missed=[(s, "misfire: skipped (late)") for s in late])
    if policy is MisfirePolicy.RUN_ONCE:
        keep = slots[-1:]
        reason = "misfire: coalesced into the latest slot (run_once)"
        return FirePlan(run_slots=keep, missed=[(s, reason) for s in slots[:-1]])
    keep = late[-task.max_catchup :] + on_time if late else on_time
    dropped = [s for s in late if s not in keep]
    return FirePlan(run_slots=keep, missed=[(s, "misfire: beyond max_catchup") for s in dropped])


def _by_overlap(plan: FirePlan, task: Task, *, active: bool) -> FirePlan:
    policy = OverlapPolicy(task.overlap_policy)
    if not active or policy is OverlapPolicy.ALLOW or not plan.run_slots:
        return plan
    if policy is OverlapPolicy.FORBID:
        missed = plan.missed + [
            (s, "overlap: a run of this task is still active") for s in plan.run_slots
        ]
        return FirePlan(missed=missed)
    return FirePlan(run_slots=plan.run_slots[-1:], missed=plan.missed, cancel_active=True)


def plan_firing(task: Task, now: datetime, *, active: bool) -> FirePlan:
    """The plan for a task whose next_fire_at has come."""
    assert task.schedule is not None and task.next_fire_at is not None
    window, nxt = slots_until(
        task.schedule, task.timezone, start=task.next_fire_at, end=now, limit=MAX_SLOTS_PER_TICK
    )
    slots = list(window)
    if nxt is None:
        # Far behind: this window does not reach `now`, so every slot in it is late. The policy
        # applies once, in the window that reaches `now`; here the slots are only recorded.
        missed = [(s, "misfire: too far behind, slot not run") for s in slots]
        return FirePlan(
            missed=missed, next_fire_at=first_slot_after(task.schedule, task.timezone, slots[-1])
        )
    plan = _by_overlap(_by_misfire(task, slots, now), task, active=active)
    return FirePlan(
        run_slots=plan.run_slots,
        missed=plan.missed,
        cancel_active=plan.cancel_active,
        next_fire_at=nxt,
    )


def fire_due_tasks(store: Store, *, now: datetime, batch: int = 500) -> int:
    """Apply the plan of every due task; return the number of runs queued.

    All due tasks are fired before anything is sent, so a herd's fire lag is the time to plan
    and insert it (a few statements per batch), not that plus the sends.
    """
    total = 0
    while True:
        fired, queued = store.fire_due(now=now, planner=plan_firing, limit=batch)
        total += queued
        if fired < batch:
            return total
