"""Small helpers every controller shares."""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.di import NamedDependency

from service.store import Store

StoreDep = NamedDependency[Store]  # the app's Store, injected by name (see create_app)


def audit_entry(
    request: Request[Any, Any, Any], action: str, object_type: str, object_id: str, **detail: Any
) -> dict[str, Any]:
    """Who did what to which object, from where (for `Store.audit` or a store write's `audit`)."""
    return {
        "actor": getattr(request.user, "name", "?"),
        "action": action,
        "object_type": object_type,
        "object_id": object_id,
        "remote": request.client.host if request.client else None,
        "detail": detail,
    }


def audit(
    request: Request[Any, Any, Any],
    store: Store,
    action: str,
    object_type: str,
    object_id: str,
    **detail: Any,
) -> None:
    """Record who did what to which object, from where."""
    store.audit(**audit_entry(request, action, object_type, object_id, **detail))
