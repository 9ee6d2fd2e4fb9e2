"""/api/tasks: create, list, show, update, delete, trigger, run history."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, patch, post
from litestar.params import FromPath, FromQuery, HeaderParameter, JSONBody, Parameter
from litestar.status_codes import HTTP_202_ACCEPTED, HTTP_204_NO_CONTENT

from executors import ExecutorConfig
from service.api.common import StoreDep, audit, audit_entry
from service.api.security import CAN_AUTHOR, CAN_OPERATE, CAN_READ, check_task_patch
from service.errors import ValidationError
from service.models import Page, Run, Task
from service.schedule import next_slots
from service.secrets import (
    check_no_clash,
    masked,
    merged_secret_names,
    save_new_task_secrets,
    save_task_secrets,
    take_secrets,
)
from service.tasks import check_parameters, executor_config, parse_task_body, task_values
from service.tracing import current_traceparent

Limit = Annotated[int, Parameter(ge=1, le=500, description="page size (max 500)")]
Cursor = Annotated[
    int | None, Parameter(ge=1, le=2**63 - 1, description="next_cursor of the previous page")
]


class TriggerBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Optional trigger body."""

    parameters: dict[str, Any] = {}


def task_view(task: Task, *, upcoming: int = 0, secrets: Iterable[str] = ()) -> dict[str, Any]:
    """A task as the API shows it (flat), with the next fire times when asked."""
    out = task.flat() | {"secrets": masked(secrets)}  # names only, never values
    if upcoming and task.schedule and task.enabled:
        now = datetime.now(UTC)
        out["next_fire_times"] = next_slots(task.schedule, task.timezone, after=now, count=upcoming)
    return out


def _config(request: Request[Any, Any, Any]) -> ExecutorConfig:
    """This API process's view of the machine (notebooks root, HTTP allowlist) for validation,
    worked out once per process (it resolves a path)."""
    state = request.app.state
    config: ExecutorConfig | None = state.get("executor_config")
    if config is None:
        config = state.executor_config = executor_config(state.settings)
    return config


class TaskController(Controller):
    path = "/api/tasks"
    tags = ["tasks"]

    @post("/", operation_id="createTask", guards=CAN_AUTHOR, sync_to_thread=True)
    def create(
        self, request: Request[Any, Any, Any], store: StoreDep, data: JSONBody[dict[str, Any]]
    ) -> dict[str, Any]:
        """Create a task; the body is flat, `executor` picks the kind."""
        secrets = take_secrets(data)
        fields, spec = parse_task_body(data, config=_config(request))
        check_no_clash(secrets, fields.env)
        task = store.insert_task(task_values(fields, spec))
        save_new_task_secrets(store, request.app.state.settings, task.id, secrets)
        audit(request, store, "task.create", "task", str(task.id), name=task.name)
        return task_view(task, upcoming=5, secrets=secrets)

    @get("/", operation_id="listTasks", guards=CAN_READ, sync_to_thread=True)
    def list_tasks(
        self,
        store: StoreDep,
        limit: Limit = 50,
        cursor: Cursor = None,
        enabled: FromQuery[bool | None] = None,
        executor: FromQuery[str | None] = None,
        tag: FromQuery[str | None] = None,
        q: Annotated[str | None, Parameter(max_length=100)] = None,
    ) -> Page:
        """Tasks in id order, keyset-paginated, filterable by enabled, executor, tag and name."""
        tasks = store.list_tasks(
            limit=limit, cursor=cursor, enabled=enabled, executor=executor, tag=tag, q=q
        )
        nxt = tasks[-1].id if len(tasks) == limit else None
        names = store.task_secret_names([t.id for t in tasks])
        return Page(items=[task_view(t, secrets=names[t.id]) for t in tasks], next_cursor=nxt)

    @get("/{ref:str}", operation_id="getTask", guards=CAN_READ, sync_to_thread=True)
    def show(self, store: StoreDep, ref: FromPath[str]) -> dict[str, Any]:
        """One task by id or name, with its next 5 fire times."""
        task, secrets = store.get_task_view(ref)
        return task_view(task, upcoming=5, secrets=secrets)

    @patch("/{ref:str}", operation_id="updateTask", guards=CAN_OPERATE, sync_to_thread=True)
    def update(
        self,
        request: Request[Any, Any, Any],
        store: StoreDep,
        ref: FromPath[str],
        data: JSONBody[dict[str, Any]],
    ) -> dict[str, Any]:
        """Change some fields; the whole task is validated again. Operators may change only
        `enabled` (pause/resume); a `secrets` entry set to null is deleted."""
        if not isinstance(data, dict):
            raise ValidationError("the body must be a JSON object")
        check_task_patch(request, data)
        changed = sorted(data)
        secrets = take_secrets(data, partial=True)
        task = store.get_task(ref)
        merged = task.body() | data
        if data.get("executor", task.executor) != task.executor:
            merged = {k: v for k, v in merged.items() if k not in task.spec or k in data}
        fields, spec = parse_task_body(merged, config=_config(request))
        names = merged_secret_names(store.task_secret_names([task.id])[task.id], secrets)
        check_no_clash(names, fields.env)
        updated = store.update_task(task.id, task_values(fields, spec, previous=task))
        save_task_secrets(store, request.app.state.settings, task.id, secrets)
        audit(request, store, "task.update", "task", str(task.id), fields=changed)
        return task_view(updated, upcoming=5, secrets=names)

    @delete(
        "/{ref:str}",
        operation_id="deleteTask",
        guards=CAN_AUTHOR,
        sync_to_thread=True,
        status_code=HTTP_204_NO_CONTENT,
    )
    def remove(self, request: Request[Any, Any, Any], store: StoreDep, ref: FromPath[str]) -> None:
        """Delete a task and its run history."""
        task = store.get_task(ref)
        store.delete_task(task.id)
        audit(request, store, "task.delete", "task", str(task.id), name=task.name)

    @post(
        "/{ref:str}/trigger",
        operation_id="triggerTask",
        guards=CAN_OPERATE,
        sync_to_thread=True,
        status_code=HTTP_202_ACCEPTED,
    )
    def trigger(
        self,
        request: Request[Any, Any, Any],
        store: StoreDep,
        ref: FromPath[str],
        data: JSONBody[TriggerBody | None] = None,
        idempotency_key: Annotated[
            str | None, HeaderParameter(name="Idempotency-Key", max_length=200)
        ] = None,
    ) -> Run:
        """Queue a run now; the same Idempotency-Key returns the same run."""
        task = store.get_task(ref)
        parameters = check_parameters(
            data.parameters if data else {}, task=task, config=_config(request)
        )
        return store.trigger_run(
            task,
            parameters=parameters,
            idempotency_key=idempotency_key,
            audit=audit_entry(request, "task.trigger", "task", str(task.id)),
            traceparent=current_traceparent(),
        )[0]

    @get("/{ref:str}/runs", operation_id="listTaskRuns", guards=CAN_READ, sync_to_thread=True)
    def runs(
        self,
        store: StoreDep,
        ref: FromPath[str],
        limit: Limit = 50,
        cursor: Cursor = None,
        status: FromQuery[str | None] = None,
    ) -> Page:
        """This task's runs, newest first."""
        task = store.get_task(ref)
        runs = store.list_runs(limit=limit, cursor=cursor, task_id=task.id, status=status)
        return Page(items=runs, next_cursor=runs[-1].id if len(runs) == limit else None)
