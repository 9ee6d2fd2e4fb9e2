"""Authentication middleware (API key in `Authorization: Bearer` or `X-API-Key`) and role guards."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio.to_thread
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from service.auth import Principal, authenticate
from service.errors import AuthError, ForbiddenError
from service.models import Role

OPEN_PATHS = ["^/health$", "^/schema"]


def credentials(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """The key the caller sent, or AuthError when none was."""
    header = connection.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = connection.headers.get("x-api-key", "").strip()
    if key:
        return key
    raise AuthError("missing credentials: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")


class KeyAuthMiddleware(AbstractAuthenticationMiddleware):
    """Every route except OPEN_PATHS needs a valid, unrevoked key."""

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        key = credentials(connection)
        store = connection.app.state.store
        principal = await anyio.to_thread.run_sync(authenticate, store, key)
        return AuthenticationResult(user=principal, auth=key)


def requires(role: Role) -> Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], None]:
    """A guard allowing callers whose role includes `role`."""

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        user = connection.scope.get("user")
        if not isinstance(user, Principal):
            raise AuthError("authentication required")
        if not user.role.allows(role):
            raise ForbiddenError(f"this needs the {role.value} role; your key is {user.role.value}")

    return guard


CAN_READ = [requires(Role.VIEWER)]
CAN_OPERATE = [requires(Role.OPERATOR)]
CAN_AUTHOR = [requires(Role.AUTHOR)]
ADMIN_ONLY = [requires(Role.ADMIN)]
