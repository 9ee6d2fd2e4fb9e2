"""Domain types: statuses, task and run records, and the validation of a task body."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from croniter import croniter

from service.errors import ValidationError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
_NAME_RE = re.compile(NAME_PATTERN)
_MSGSPEC_PATH_RE = re.compile(r"`\$\.?([^`\[]*)")
CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


class RunStatus(StrEnum):
    QUEUED = "queued"  # waiting for the dispatcher and a worker
    RUNNING = "running"  # claimed by a worker, executing
    SUCCEEDED = "succeeded"  # the executor reported success
    FAILED = "failed"  # the executor reported failure, or its worker was lost
    TIMED_OUT = "timed_out"  # killed after timeout_seconds
    CANCELLED = "cancelled"  # stopped on request before or while running
    MISSED = "missed"  # a slot skipped by the misfire or overlap policy; `reason` says why

    @property
    def terminal(self) -> bool:
        """True once the run can never change again."""
        return self not in (RunStatus.QUEUED, RunStatus.RUNNING)


class Trigger(StrEnum):
    MANUAL = "manual"  # API, CLI or magic trigger
    SCHEDULE = "schedule"  # a cron slot
    RETRY = "retry"  # the next attempt after a failure
    DEPENDENCY = "dependency"  # released by upstream tasks that succeeded


class MisfirePolicy(StrEnum):
    SKIP = "skip"  # late slots are recorded as missed
    RUN_ONCE = "run_once"  # one run for all late slots
    RUN_ALL = "run_all"  # every late slot runs, bounded by max_catchup


class OverlapPolicy(StrEnum):
    ALLOW = "allow"  # runs of one task may overlap
    FORBID = "forbid"  # a slot is missed while a run of the task is active
    REPLACE = "replace"  # the active run is cancelled, the new one starts


class Role(StrEnum):
    VIEWER = "viewer"  # read everything
    OPERATOR = "operator"  # viewer + trigger, cancel, pause, resume
    AUTHOR = "author"  # operator + create, update, delete tasks
    ADMIN = "admin"  # everything, including keys and audit

    def allows(self, needed: Role) -> bool:
        """True when this role includes `needed`."""
        order = list(Role)
        return order.index(self) >= order.index(needed)


Name = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0, le=7 * 24 * 3600)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=1000)]
Seconds = Annotated[int, msgspec.Meta(ge=0, le=7 * 24 * 3600)]
EnvName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]


EMAIL_PATTERN = r"^[^@\s<>,;]+@[^@\s<>,;]+$"
NotifyEvent = Literal["failure", "success", "recovery"]


class NotifyRule(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Who to tell when a run of the task ends (service/notify.py delivers it)."""

    on: Annotated[list[NotifyEvent], msgspec.Meta(max_length=3)] = []
    after_failures: Annotated[int, msgspec.Meta(ge=1, le=1000)] | None = None
    webhook: Annotated[str, msgspec.Meta(pattern=r"^https?://", max_length=2000)] | None = None
    email: Annotated[
        list[Annotated[str, msgspec.Meta(pattern=EMAIL_PATTERN, max_length=254)]],
        msgspec.Meta(max_length=20),
    ] = []


class TaskFields(msgspec.Struct, kw_only=True, frozen=True):
    """The fields every task has, whatever its executor."""

    name: Name
    executor: Annotated[str, msgspec.Meta(min_length=1, max_length=50)]
    description: Annotated[str, msgspec.Meta(max_length=2000)] = ""
    tags: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=50)]], msgspec.Meta(max_length=20)
    ] = []
    schedule: str | None = None
    timezone: str = "UTC"
    enabled: bool = True
    timeout_seconds: PositiveInt | None = None
    max_retries: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    retry_delay_seconds: Seconds = 60
    depends_on: Annotated[list[Name], msgspec.Meta(max_length=50)] = []
    misfire_policy: MisfirePolicy = MisfirePolicy.RUN_ONCE
    misfire_grace_seconds: Seconds = 60
    max_catchup: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    overlap_policy: OverlapPolicy = OverlapPolicy.ALLOW
    queue: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,50}$")] = "default"
    env: dict[EnvName, Annotated[str, msgspec.Meta(max_length=32768)]] = {}
    notify: NotifyRule = msgspec.field(default_factory=NotifyRule)
    # artifacts of the newest N runs are kept (the latest successful report always); None: all
    keep_last: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None = None


COMMON_FIELDS = frozenset(TaskFields.__struct_fields__)


def field_of(exc: msgspec.ValidationError) -> str | None:
    """The field a msgspec validation message points at (`... - at `$.name``)."""
    match = _MSGSPEC_PATH_RE.search(str(exc))
    return match.group(1) if match else None


def convert_or_422(data: Any, kind: type[Any], *, prefix: str = "") -> Any:
    """msgspec.convert that raises our ValidationError naming the field."""
    try:
        return msgspec.convert(data, kind, strict=True)
    except msgspec.ValidationError as exc:
        field = field_of(exc)
        named = re.search(r"(?:unknown|missing required) field `([^`]+)`", str(exc))
        if named:
            field = f"{field}.{named.group(1)}" if field else named.group(1)
        name = f"{prefix}{field}" if field else None
        raise ValidationError(f"{exc}".replace("$.", ""), field=name) from exc


def check_name(name: str) -> None:
    """A task name: letters, digits, `_ . -`, at most 100 characters, not all digits."""
    if not _NAME_RE.match(name):
        raise ValidationError(
            "name must start with a letter or digit and use only letters, digits, '_', '.', '-'"
            " (at most 100 characters)",
            field="name",
        )
    if name.isdigit():
        raise ValidationError("name cannot be all digits (it would read as an id)", field="name")


def check_timezone(tz: str) -> ZoneInfo:
    """The IANA zone named `tz`, or a 422 naming `timezone`."""
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValidationError(f"unknown time zone {tz!r}", field="timezone") from exc


def check_schedule(schedule: str) -> None:
    """A 5-field cron expression or an @alias, else a 422 naming `schedule` and the bad field."""
    text = schedule.strip()
    if text in CRON_ALIASES:
        return
    parts = text.split()
    if len(parts) != 5:
        raise ValidationError(
            f"schedule {schedule!r} must have 5 fields (minute hour day month weekday)"
            f" or be one of {', '.join(CRON_ALIASES)}",
            field="schedule",
        )
    labels = ("minute", "hour", "day-of-month", "month", "day-of-week")
    for label, part in zip(labels, parts, strict=True):
        probe = ["*"] * 5
        probe[labels.index(label)] = part
        if not croniter.is_valid(" ".join(probe)):
            raise ValidationError(
                f"schedule {schedule!r}: invalid {label} field {part!r}", field="schedule"
            )
    if not croniter.is_valid(text):
        raise ValidationError(
            f"schedule {schedule!r} is not a valid cron expression", field="schedule"
        )


def validate_common(fields: TaskFields) -> None:
    """Checks that msgspec's types alone cannot express."""
    check_name(fields.name)
    check_timezone(fields.timezone)
    if fields.schedule is not None:
        check_schedule(fields.schedule)
    if fields.name in fields.depends_on:
        raise ValidationError("a task cannot depend on itself", field="depends_on")
    check_notify(fields.notify)


def check_notify(rule: NotifyRule) -> None:
    """A rule that asks for notifications must name somewhere to send them."""
    wants = bool(rule.on) or rule.after_failures is not None
    if wants and not (rule.webhook or rule.email):
        raise ValidationError("notify needs a webhook or an email to send to", field="notify")


class Task(msgspec.Struct, kw_only=True, frozen=True):
    """A stored task: common fields as columns, executor fields in `spec`."""

    id: int
    name: str
    executor: str
    spec: dict[str, Any]
    description: str
    tags: list[str]
    schedule: str | None
    timezone: str
    enabled: bool
    timeout_seconds: int | None
    max_retries: int
    retry_delay_seconds: int
    depends_on: list[str]
    misfire_policy: str
    misfire_grace_seconds: int
    max_catchup: int
    overlap_policy: str
    queue: str
    env: dict[str, str]
    next_fire_at: datetime | None
    created_at: datetime
    updated_at: datetime
    notify: dict[str, Any] = {}
    keep_last: int | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Task:
        return cls(**{k: row[k] for k in cls.__struct_fields__ if k in row})

    def flat(self) -> dict[str, Any]:
        """The task as users write it: executor fields next to the common ones."""
        out = {k: getattr(self, k) for k in self.__struct_fields__ if k != "spec"}
        out.update(self.spec)
        return out

    def body(self) -> dict[str, Any]:
        """The writable fields only, to merge a PATCH into."""
        out = {k: getattr(self, k) for k in COMMON_FIELDS}
        out.update(self.spec)
        return out


class Run(msgspec.Struct, kw_only=True, frozen=True):
    """One execution (or one missed slot) of a task."""

    id: int
    task_id: int
    task_name: str | None = None
    status: RunStatus
    trigger: str
    attempt: int
    retry_of: int | None
    parameters: dict[str, Any]
    queue: str
    scheduled_for: datetime | None
    not_before: datetime
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker: str | None
    exit_code: int | None
    error: str | None
    reason: str | None
    cancel_requested: bool

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Run:
        values = {k: row[k] for k in cls.__struct_fields__ if k in row}
        return cls(**values | {"status": RunStatus(row["status"])})


class ApiKey(msgspec.Struct, kw_only=True, frozen=True):
    """An API key's record; the key itself is never stored."""

    id: int
    name: str
    role: Role
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ApiKey:
        return cls(**{k: row[k] for k in cls.__struct_fields__})


class Page(msgspec.Struct, kw_only=True):
    """A page of a keyset-paginated list; pass `next_cursor` as `cursor` for the next page."""

    items: list[Any]
    next_cursor: int | None


class RunResult(msgspec.Struct, kw_only=True, frozen=True):
    """What a worker records when a run ends (or ends an attempt that will be retried)."""

    run_id: int
    status: str
    exit_code: int | None = None
    error: str | None = None
