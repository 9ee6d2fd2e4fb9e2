"""/api/tasks/{ref}/report: the latest successful HTML report of a task, a stable link to share."""

from __future__ import annotations

from litestar import Controller, Response, get
from litestar.params import FromPath

from service.api.artifacts import SAFE_HEADERS
from service.api.common import StoreDep
from service.api.security import CAN_READ

REPORT_NAME = "report.html"


def report_headers(run_id: int) -> dict[str, str]:
    """The artifact route's safety headers (sandboxed, never sniffed) and the run it came from."""
    return SAFE_HEADERS | {
        "Content-Disposition": f'inline; filename="{REPORT_NAME}"',
        "X-Nbcron-Run-Id": str(run_id),
    }


class ReportController(Controller):
    path = "/api/tasks/{ref:str}/report"
    tags = ["tasks"]

    @get("/", operation_id="getTaskReport", guards=CAN_READ, sync_to_thread=True)
    def latest(self, store: StoreDep, ref: FromPath[str]) -> Response[bytes]:
        """The newest succeeded run's `report.html` (404 until one exists); served sandboxed."""
        task = store.get_task(ref)
        row = store.latest_report(task.id)
        return Response(
            content=bytes(row["data"]),
            media_type=row["content_type"],
            headers=report_headers(row["run_id"]),
        )
