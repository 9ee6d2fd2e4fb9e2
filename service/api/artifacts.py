"""/api/runs/{run_id}/artifacts: what a run produced (output notebook, HTML report, response)."""

from __future__ import annotations

import re
from datetime import datetime

import msgspec
from litestar import Controller, Response, get
from litestar.params import FromPath

from service.api.common import StoreDep
from service.api.security import CAN_READ
from service.errors import ValidationError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
# Artifacts hold whatever a notebook printed: never let the browser sniff, script or
# share an origin with the API.
SAFE_HEADERS = {
    "Content-Security-Policy": "sandbox",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "private, no-store",
}


class ArtifactRead(msgspec.Struct, kw_only=True, frozen=True):
    """An artifact without its bytes."""

    name: str
    content_type: str
    size: int
    created_at: datetime


def check_artifact_name(name: str) -> str:
    """A plain file name: letters, digits, `_ . -`, starting with a letter or digit."""
    if not NAME_RE.match(name):
        raise ValidationError(f"artifact name {name!r} is not valid", field="name")
    return name


def _disposition(name: str, content_type: str) -> str:
    kind = "inline" if content_type.startswith(("text/html", "application/json")) else "attachment"
    return f'{kind}; filename="{name}"'


class ArtifactController(Controller):
    path = "/api/runs/{run_id:int}/artifacts"
    tags = ["runs"]

    @get("/", operation_id="listRunArtifacts", guards=CAN_READ, sync_to_thread=True)
    def list_artifacts(self, store: StoreDep, run_id: FromPath[int]) -> list[ArtifactRead]:
        """The run's artifacts (name, content type, size, created_at)."""
        return [ArtifactRead(**row) for row in store.list_artifacts(run_id)]

    @get("/{name:str}", operation_id="getRunArtifact", guards=CAN_READ, sync_to_thread=True)
    def download(
        self, store: StoreDep, run_id: FromPath[int], name: FromPath[str]
    ) -> Response[bytes]:
        """One artifact's bytes with its content type; HTML is served sandboxed."""
        row = store.get_artifact(run_id, check_artifact_name(name))
        headers = SAFE_HEADERS | {"Content-Disposition": _disposition(name, row["content_type"])}
        return Response(content=bytes(row["data"]), media_type=row["content_type"], headers=headers)
