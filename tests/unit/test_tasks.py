"""service.models + service.tasks: validation of task bodies and trigger parameters."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from service.errors import ValidationError
from service.models import RunStatus, Task, TaskFields
from service.tasks import MAX_PARAMETERS_BYTES, check_parameters, parse_task_body, task_values

CONTRACT_EXAMPLE: dict[str, Any] = {"name": "test", "executor": "shell", "command": "echo hello"}


def body(**changes: Any) -> dict[str, Any]:
    """The contract example with some fields changed; a value of ... removes the field."""
    out = dict(CONTRACT_EXAMPLE)
    for key, value in changes.items():
        if value is ...:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def test_contract_example_parses() -> None:
    fields, spec = parse_task_body(CONTRACT_EXAMPLE)
    assert isinstance(fields, TaskFields)
    assert fields.name == "test"
    assert fields.executor == "shell"
    assert fields.schedule is None
    assert fields.timezone == "UTC"
    assert spec == {"command": "echo hello", "cwd": None, "shell": "/bin/sh"}


def test_full_body_parses() -> None:
    fields, spec = parse_task_body(
        body(
            schedule="*/5 * * * *",
            timezone="Europe/Berlin",
            timeout_seconds=30,
            max_retries=2,
            depends_on=["upstream"],
            misfire_policy="run_all",
            overlap_policy="forbid",
            tags=["etl"],
            env={"FOO": "bar"},
            cwd="/tmp",
            id=99,  # ignored: ids are not writable
        )
    )
    assert fields.timeout_seconds == 30
    assert fields.depends_on == ["upstream"]
    assert fields.misfire_policy == "run_all"
    assert spec["cwd"] == "/tmp"
    assert "id" not in spec


@pytest.mark.parametrize(
    "schedule", ["@daily", "@hourly", "@weekly", "0 3 * * 1-5", "*/15 * * * *"]
)
def test_valid_schedules_are_accepted(schedule: str) -> None:
    fields, _ = parse_task_body(body(schedule=schedule))
    assert fields.schedule == schedule


BAD_BODIES: list[tuple[str, Any, str | None]] = [
    ("missing name", body(name=...), "name"),
    ("missing executor", body(executor=...), "executor"),
    ("missing command", body(command=...), "command"),
    ("empty command", body(command=""), "command"),
    ("timeout not an int", body(timeout_seconds="x"), "timeout_seconds"),
    ("timeout zero", body(timeout_seconds=0), "timeout_seconds"),
    ("unknown executor", body(executor="teleport"), "executor"),
    ("bad cron minute", body(schedule="61 * * * *"), "schedule"),
    ("cron with 4 fields", body(schedule="* * * *"), "schedule"),
    ("cron with 6 fields", body(schedule="* * * * * *"), "schedule"),
    ("unknown timezone", body(timezone="Mars/Olympus"), "timezone"),
    ("empty name", body(name=""), "name"),
    ("101-char name", body(name="a" * 101), "name"),
    ("all-digit name", body(name="12345"), "name"),
    ("name with a space", body(name="my task"), "name"),
    ("typo in a field", body(command=..., comand="echo hi"), "comand"),
    ("typo next to the right field", body(comand="echo hi"), "comand"),
    ("field of another executor", body(url="http://example.com"), "url"),
    ("depends on itself", body(depends_on=["other", "test"]), "depends_on"),
    ("bad misfire policy", body(misfire_policy="sometimes"), "misfire_policy"),
    ("bad overlap policy", body(overlap_policy="maybe"), "overlap_policy"),
    ("max_catchup zero", body(max_catchup=0), "max_catchup"),
    ("bad env name", body(env={"1BAD": "x"}), "env"),
    ("body is a list", [CONTRACT_EXAMPLE], None),
    ("body is a string", "echo hello", None),
    ("body is None", None, None),
]


@pytest.mark.parametrize(
    ("raw", "field"), [(b, f) for _, b, f in BAD_BODIES], ids=[i for i, _, _ in BAD_BODIES]
)
def test_bad_bodies_name_the_field(raw: Any, field: str | None) -> None:
    with pytest.raises(ValidationError) as info:
        parse_task_body(raw)
    assert info.value.field == field
    assert info.value.status_code == 422
    assert str(info.value)  # a message for the problem+json detail


def test_bad_cron_message_names_the_minute_field() -> None:
    with pytest.raises(ValidationError, match="minute") as info:
        parse_task_body(body(schedule="61 * * * *"))
    assert "61" in str(info.value)


def test_bad_cron_message_names_the_hour_field() -> None:
    with pytest.raises(ValidationError, match="hour"):
        parse_task_body(body(schedule="0 25 * * *"))


def test_unknown_executor_message_lists_known_kinds() -> None:
    with pytest.raises(ValidationError, match="shell"):
        parse_task_body(body(executor="teleport"))


def test_task_values_compute_next_fire_at() -> None:
    fields, spec = parse_task_body(body(schedule="0 * * * *"))
    now = datetime(2026, 1, 1, 10, 15, tzinfo=UTC)
    values = task_values(fields, spec, now=now)
    assert values["next_fire_at"] == datetime(2026, 1, 1, 11, 0, tzinfo=UTC)
    assert values["spec"] == spec
    assert values["name"] == "test"


def test_task_values_no_next_fire_when_unscheduled() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    fields, spec = parse_task_body(CONTRACT_EXAMPLE)
    assert task_values(fields, spec, now=now)["next_fire_at"] is None


def test_pausing_keeps_the_pending_slot_and_a_new_schedule_starts_from_now() -> None:
    # A paused task keeps next_fire_at (the dispatcher skips disabled tasks), so resuming applies
    # the misfire policy to the slots that passed meanwhile.
    created = datetime(2026, 1, 1, tzinfo=UTC)
    later = datetime(2026, 1, 2, 5, 17, tzinfo=UTC)
    fields, spec = parse_task_body(body(schedule="0 * * * *"))
    values = task_values(fields, spec, now=created)
    previous = Task(
        id=1,
        created_at=created,
        updated_at=created,
        **{k: v for k, v in values.items() if k != "next_fire_at"},
        next_fire_at=values["next_fire_at"],
    )
    paused, spec = parse_task_body(body(schedule="0 * * * *", enabled=False))
    assert (
        task_values(paused, spec, now=later, previous=previous)["next_fire_at"]
        == values["next_fire_at"]
    )
    moved, spec = parse_task_body(body(schedule="30 * * * *"))
    assert task_values(moved, spec, now=later, previous=previous)["next_fire_at"] == datetime(
        2026, 1, 2, 5, 30, tzinfo=UTC
    )


def test_check_parameters_accepts_plain_objects() -> None:
    params = {"date": "2026-01-01", "n": 3, "nested": {"a": [1, 2]}}
    assert check_parameters(params) == params
    assert check_parameters({}) == {}


@pytest.mark.parametrize(
    "params",
    [
        ["a", "b"],
        "date=2026",
        None,
        {"bad key": 1},
        {"1st": 1},
        {"a-b": 1},
        {"": 1},
        {"big": "x" * (MAX_PARAMETERS_BYTES + 1)},
    ],
    ids=["list", "string", "none", "space", "digit-first", "dash", "empty-key", "too-big"],
)
def test_check_parameters_rejects(params: Any) -> None:
    with pytest.raises(ValidationError) as info:
        check_parameters(params)
    assert info.value.field == "parameters"


def test_run_status_terminal() -> None:
    assert not RunStatus.QUEUED.terminal
    assert not RunStatus.RUNNING.terminal
    terminal = {"succeeded", "failed", "timed_out", "cancelled", "missed"}
    assert {s.value for s in RunStatus if s.terminal} == terminal
