"""The nbcron error tree. The API maps each branch to an RFC 9457 problem+json status.

NbcronError
├── ValidationError        422  bad input; `field` names what is wrong
├── NotFoundError          404  no such task, run, key or artifact
├── ConflictError          409  duplicate name, run not in a state that allows the change
├── AuthError              401  missing, wrong or revoked credentials
│   └── ForbiddenError     403  authenticated, but the role does not allow it
├── UnavailableError       503  Postgres or the broker cannot be reached
├── MigrationError              an applied migration was edited, or one failed
└── ExecutorError               an executor could not run (unknown kind, bad spec at run time)
"""

from __future__ import annotations

from typing import Any


class NbcronError(Exception):
    """Base of every error nbcron raises on purpose."""

    status_code: int = 500
    title: str = "Internal error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class ValidationError(NbcronError):
    """Input that does not fit; `field` is the dotted name of the offending field."""

    status_code = 422
    title = "Invalid input"

    def __init__(self, detail: str, *, field: str | None = None, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.field = field
        if field is not None:
            self.extra.setdefault("field", field)


class NotFoundError(NbcronError):
    status_code = 404
    title = "Not found"


class ConflictError(NbcronError):
    status_code = 409
    title = "Conflict"


class AuthError(NbcronError):
    status_code = 401
    title = "Unauthorized"


class ForbiddenError(AuthError):
    status_code = 403
    title = "Forbidden"


class UnavailableError(NbcronError):
    status_code = 503
    title = "Service unavailable"


class MigrationError(NbcronError):
    title = "Migration error"


class ExecutorError(NbcronError):
    title = "Executor error"
