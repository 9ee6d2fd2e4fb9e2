"""/api/audit: who changed what, when and from where — admin only."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, get
from litestar.params import Parameter

from service.api.common import StoreDep
from service.api.security import ADMIN_ONLY

AuditLimit = Annotated[int, Parameter(ge=1, le=500, description="page size (max 500)")]
AuditCursor = Annotated[
    int | None, Parameter(ge=1, le=2**63 - 1, description="next_cursor of the previous page")
]
Filter = Annotated[str | None, Parameter(max_length=200)]


class AuditEntry(msgspec.Struct, kw_only=True, frozen=True):
    """One audited action."""

    id: int
    at: datetime
    actor: str  # the key's name
    action: str  # e.g. task.create, task.update, task.trigger, run.cancel, key.revoke
    object_type: str
    object_id: str | None
    remote: str | None  # the client address
    detail: dict[str, Any]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> AuditEntry:
        return cls(**{k: row[k] for k in cls.__struct_fields__})


class AuditPage(msgspec.Struct, kw_only=True):
    """A page of audit entries, newest first; pass `next_cursor` as `cursor` for the next."""

    items: list[AuditEntry]
    next_cursor: int | None


class AuditController(Controller):
    path = "/api/audit"
    tags = ["audit"]
    guards = ADMIN_ONLY

    @get("/", operation_id="listAudit", sync_to_thread=True)
    def list_audit(
        self,
        store: StoreDep,
        limit: AuditLimit = 50,
        cursor: AuditCursor = None,
        actor: Filter = None,
        action: Filter = None,
        object_type: Filter = None,
        object_id: Filter = None,
    ) -> AuditPage:
        """The audit log, newest first, filterable by actor, action and object."""
        rows = store.list_audit(
            limit=limit,
            cursor=cursor,
            actor=actor,
            action=action,
            object_type=object_type,
            object_id=object_id,
        )
        items = [AuditEntry.from_row(r) for r in rows]
        return AuditPage(items=items, next_cursor=items[-1].id if len(items) == limit else None)
