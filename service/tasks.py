"""Task bodies: split the flat body into common and executor fields, validate both."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from executors import ExecutorConfig, SpecError, UnknownExecutorError, get_executor
from service.config import Settings
from service.errors import ValidationError
from service.models import COMMON_FIELDS, Task, TaskFields, convert_or_422, validate_common
from service.schedule import first_slot_after

MAX_PARAMETERS_BYTES = 256 * 1024


def executor_config(settings: Settings) -> ExecutorConfig:
    """The machine-level settings executors see (worker runs, API checks)."""
    return ExecutorConfig(
        notebooks_dir=settings.notebooks_dir.resolve(),
        http_allowlist=settings.http_allowlist,
        http_max_response_bytes=settings.http_max_response_bytes,
        kernel_pool_size=settings.kernel_pool_size,
        kernel_pool_kernels=settings.kernel_pool_kernels,
    )


def parse_task_body(
    body: Any, *, config: ExecutorConfig | None = None
) -> tuple[TaskFields, dict[str, Any]]:
    """Validate a flat task body; return the common fields and the executor's own fields.

    With `config`, executors also check what this machine can see (e.g. the notebook file).
    """
    if not isinstance(body, dict):
        raise ValidationError("the task body must be a JSON object", field=None)
    common = {k: v for k, v in body.items() if k in COMMON_FIELDS}
    rest = {k: v for k, v in body.items() if k not in COMMON_FIELDS and k != "id"}
    fields: TaskFields = convert_or_422(common, TaskFields)
    validate_common(fields)
    return fields, parse_spec(fields.executor, rest, config=config)


def parse_spec(
    kind: str, raw: dict[str, Any], *, config: ExecutorConfig | None = None
) -> dict[str, Any]:
    """The executor's fields, validated by the executor itself, as plain JSON data."""
    try:
        executor = get_executor(kind)
    except UnknownExecutorError as exc:
        raise ValidationError(str(exc), field="executor") from exc
    try:
        spec = executor.parse_spec(raw, config=config)
    except SpecError as exc:
        raise ValidationError(str(exc), field=exc.field) from exc
    return msgspec.to_builtins(spec)


def task_values(
    fields: TaskFields,
    spec: dict[str, Any],
    *,
    now: datetime | None = None,
    previous: Task | None = None,
) -> dict[str, Any]:
    """Column values for insert/update, with the next cron slot.

    Pausing keeps the pending slot, so resuming applies the task's misfire policy to the slots
    that passed while it was paused; a changed schedule or zone starts from now.
    """
    values = msgspec.to_builtins(fields)
    values["spec"] = spec
    values["next_fire_at"] = None
    if fields.schedule:
        same = previous is not None and (previous.schedule, previous.timezone) == (
            fields.schedule,
            fields.timezone,
        )
        if same and previous is not None and previous.next_fire_at is not None:
            values["next_fire_at"] = previous.next_fire_at
        else:
            when = now or datetime.now(UTC)
            values["next_fire_at"] = first_slot_after(fields.schedule, fields.timezone, when)
    return values


def check_parameters(
    parameters: Any, *, task: Task | None = None, config: ExecutorConfig | None = None
) -> dict[str, Any]:
    """Trigger parameters: a JSON object of bounded size whose keys are plain names.

    With `task`, its executor checks them too (a notebook: declared names, fitting values).
    """
    if not isinstance(parameters, dict):
        raise ValidationError("parameters must be a JSON object", field="parameters")
    for key in parameters:
        if not isinstance(key, str) or not key.isidentifier():
            raise ValidationError(
                f"parameter name {key!r} is not a valid identifier", field="parameters"
            )
    if len(msgspec.json.encode(parameters)) > MAX_PARAMETERS_BYTES:
        raise ValidationError("parameters are larger than 256 KiB", field="parameters")
    if task is not None:
        _executor_check_parameters(task, parameters, config)
    return parameters


def _executor_check_parameters(
    task: Task, parameters: dict[str, Any], config: ExecutorConfig | None
) -> None:
    try:
        executor = get_executor(task.executor)
        spec = executor.parse_spec(task.spec)
        executor.check_parameters(spec, parameters, config=config)
    except UnknownExecutorError:
        return  # the run fails with a clear message; nothing to check here
    except SpecError as exc:
        raise ValidationError(str(exc), field=exc.field or "parameters") from exc
