"""/api/runs: list, show, cancel, logs."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.params import FromPath, FromQuery, HeaderParameter, Parameter
from litestar.response import ServerSentEvent

from service.api.common import StoreDep, audit
from service.api.log_stream import follow_response, resume_offset
from service.api.security import CAN_OPERATE, CAN_READ
from service.api.tasks import Cursor, Limit
from service.models import Page, Run, RunStatus


class RunController(Controller):
    path = "/api/runs"
    tags = ["runs"]

    @get("/", operation_id="listRuns", guards=CAN_READ, sync_to_thread=True)
    def list_runs(
        self,
        store: StoreDep,
        limit: Limit = 50,
        cursor: Cursor = None,
        task: Annotated[str | None, Parameter(description="task id or name")] = None,
        status: FromQuery[RunStatus | None] = None,
    ) -> Page:
        """Runs, newest first, filterable by task and status."""
        if not task and status is None:
            runs = store.list_recent_runs(limit=limit, cursor=cursor)
        else:
            task_id = store.get_task(task).id if task else None
            runs = store.list_runs(
                limit=limit, cursor=cursor, task_id=task_id, status=status.value if status else None
            )
        return Page(items=runs, next_cursor=runs[-1].id if len(runs) == limit else None)

    @get("/{run_id:int}", operation_id="getRun", guards=CAN_READ, sync_to_thread=True)
    def show(self, store: StoreDep, run_id: FromPath[int]) -> Run:
        """One run."""
        return store.get_run(run_id)

    @post(
        "/{run_id:int}/cancel",
        operation_id="cancelRun",
        guards=CAN_OPERATE,
        sync_to_thread=True,
        status_code=200,
    )
    def cancel(
        self, request: Request[Any, Any, Any], store: StoreDep, run_id: FromPath[int]
    ) -> Run:
        """Cancel a queued run at once; ask the worker to stop a running one."""
        run = store.cancel_run(run_id)
        audit(request, store, "run.cancel", "run", str(run_id))
        return run

    @get("/{run_id:int}/logs", operation_id="getRunLogs", guards=CAN_READ, sync_to_thread=True)
    def logs(
        self,
        store: StoreDep,
        run_id: FromPath[int],
        offset: Annotated[int, Parameter(ge=0, description="chunk offset (next_offset)")] = 0,
        follow: Annotated[
            bool, Parameter(description="stream server-sent events until the run ends")
        ] = False,
        last_event_id: Annotated[str | None, HeaderParameter(name="Last-Event-ID")] = None,
    ) -> dict[str, Any] | ServerSentEvent:
        """The run's output from `offset`; poll again with `next_offset` until `finished`.

        With `follow=true`: `text/event-stream` of `log` events, then an `end` event (see
        service/api/log_stream.py)."""
        if follow:
            start = resume_offset(offset, last_event_id)
            return follow_response(store, run_id, offset=start)
        run = store.get_run(run_id)
        chunks = store.get_logs(run_id, offset=offset)
        next_offset = chunks[-1]["seq"] + 1 if chunks else offset
        return {
            "run_id": run_id,
            "status": run.status,
            "finished": run.status.terminal,
            "offset": offset,
            "next_offset": next_offset,
            "text": "".join(c["data"] for c in chunks),
        }
