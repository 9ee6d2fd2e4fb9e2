"""Authentication (API key or JWT), per-key rate limiting, role guards, CORS and safety headers.

Every request outside `open_paths()` goes through `KeyAuthMiddleware`: the credential comes from
`Authorization: Bearer <key or JWT>` or `X-API-Key: <key>`; a revoked key (or a token made from
one) is refused once the process hears of the revocation (NOTIFY: milliseconds; the revoking
process: the next request), `auth_cache_seconds` at most (see `PrincipalCache` in
service/auth.py). Each route also carries a role guard, so a route is closed twice:

    viewer < operator (trigger, cancel, pause/resume) < author (task writes) < admin (keys, audit)
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import anyio.to_thread
from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import MutableScopeHeaders
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.types import Message, Scope

from service.auth import Principal, PrincipalCache
from service.config import Settings
from service.errors import AuthError, ForbiddenError
from service.models import Role
from service.ratelimit import RateLimiter
from service.tokens import cached, jwt_secret, resolve

OPEN_PATHS = ["^/health$", "^/schema"]  # liveness, and the API's own description
METRICS_PATH = "^/metrics$"
OPERATOR_TASK_FIELDS = frozenset({"enabled"})  # what an operator may PATCH: pause and resume
CREDENTIAL_HEADERS = ["Authorization", "X-API-Key", "Content-Type", "Idempotency-Key"]
SAFETY_HEADERS = {
    "x-content-type-options": "nosniff",  # a JSON error is never sniffed into HTML
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def open_paths(settings: Settings) -> list[str]:
    """Paths that need no credentials: /health, the schema, and /metrics when made public."""
    return OPEN_PATHS + ([METRICS_PATH] if settings.metrics_public else [])


def security_state(settings: Settings) -> dict[str, Any]:
    """What the middleware needs on `app.state`: the JWT secret, the rate limiter and the
    principal cache (live once the lifespan's revocation listener is connected)."""
    return {
        "jwt_secret": jwt_secret(settings),
        "rate_limiter": RateLimiter(settings.rate_limit_per_minute),
        "principals": PrincipalCache(settings.auth_cache_seconds),
    }


def cors_config(settings: Settings) -> CORSConfig | None:
    """CORS is off unless origins are configured; credentials travel in headers, not cookies."""
    if not settings.cors_origins:
        return None
    return CORSConfig(
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST", "PATCH", "DELETE"],
        allow_headers=CREDENTIAL_HEADERS,
        allow_credentials=False,
        expose_headers=["Retry-After"],
    )


async def add_safety_headers(message: Message, scope: Scope) -> None:
    """before_send hook: safety headers on every HTTP response, errors included."""
    if message["type"] == "http.response.start":
        headers = MutableScopeHeaders.from_message(message)
        for name, value in SAFETY_HEADERS.items():
            headers.setdefault(name, value)


def credentials(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """The key or token the caller sent, or AuthError when none was."""
    header = connection.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = connection.headers.get("x-api-key", "").strip()
    if key:
        return key
    raise AuthError("missing credentials: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")


class KeyAuthMiddleware(AbstractAuthenticationMiddleware):
    """Every route except open_paths() needs a valid, unrevoked key or token, within its rate."""

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        credential = credentials(connection)
        state = connection.app.state
        principal = cached(state, credential)
        if principal is None:  # the lookup blocks: off the event loop
            principal = await anyio.to_thread.run_sync(resolve, state, credential)
        limiter: RateLimiter | None = state.get("rate_limiter")
        if limiter is not None:
            limiter.check(principal.key_id)
        return AuthenticationResult(user=principal, auth=credential)


def caller(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """The authenticated principal, or AuthError."""
    user = connection.scope.get("user")
    if not isinstance(user, Principal):
        raise AuthError("authentication required")
    return user


Guard = Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], Awaitable[None]]


def requires(role: Role) -> Guard:
    """A guard allowing callers whose role includes `role`.

    Guards are coroutines: Litestar runs a plain-function guard in a worker thread, a thread
    hop per request for a comparison of two roles."""

    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        user = caller(connection)
        if not user.role.allows(role):
            raise ForbiddenError(f"this needs the {role.value} role; your key is {user.role.value}")

    guard.required_role = role  # type: ignore[attr-defined]  # read by the auth structure test
    return guard


async def metrics_guard(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """For /metrics: open when `metrics_public` is set, else the viewer role."""
    if not connection.app.state.settings.metrics_public:
        await requires(Role.VIEWER)(connection, handler)


metrics_guard.required_role = Role.VIEWER  # type: ignore[attr-defined]


def check_task_patch(connection: ASGIConnection[Any, Any, Any, Any], fields: object) -> None:
    """Operators may PATCH only `enabled` (pause/resume); other task fields need an author."""
    user = caller(connection)
    changed = set(fields) if isinstance(fields, dict) else set()
    if not user.role.allows(Role.AUTHOR) and changed - OPERATOR_TASK_FIELDS:
        raise ForbiddenError(
            'operators may only pause and resume a task (PATCH {"enabled": true|false});'
            f" changing {', '.join(sorted(changed - OPERATOR_TASK_FIELDS))} needs the author role"
        )


CAN_READ = [requires(Role.VIEWER)]
CAN_OPERATE = [requires(Role.OPERATOR)]
CAN_AUTHOR = [requires(Role.AUTHOR)]
ADMIN_ONLY = [requires(Role.ADMIN)]
CAN_READ_METRICS = [metrics_guard]


def document_security(app: Litestar) -> None:
    """on_startup: mark the open operations (no credentials) as such in the OpenAPI document."""
    patterns = [re.compile(p) for p in open_paths(app.state.settings)]
    for path, item in (app.openapi_schema.paths or {}).items():
        if not any(p.match(path) for p in patterns):
            continue
        for method in ("get", "post", "put", "patch", "delete"):
            operation = getattr(item, method, None)
            if operation is not None:
                operation.security = []
