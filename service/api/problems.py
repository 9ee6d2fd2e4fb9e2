"""RFC 9457 problem+json responses for every error the API returns."""

from __future__ import annotations

import logging
import re
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from service.errors import NbcronError

log = logging.getLogger("nbcron.api")
PROBLEM_JSON = "application/problem+json"
_FIELD_RE = re.compile(r"(?:unknown|missing required) field `([^`]+)`|`\$\.([^`\[]+)")


def problem(status: int, title: str, detail: str, **extra: Any) -> Response[dict[str, Any]]:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def on_nbcron_error(request: Request[Any, Any, Any], exc: NbcronError) -> Response[Any]:
    if exc.status_code >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc.detail)
    return problem(exc.status_code, exc.title, exc.detail, **exc.extra)


def _validation_field(exc: ValidationException) -> str | None:
    texts = [str(exc.detail)] + [str(e.get("message", "")) for e in _extra_list(exc)]
    for item in _extra_list(exc):
        if item.get("key"):
            return str(item["key"])
    for text in texts:
        match = _FIELD_RE.search(text)
        if match:
            return match.group(1) or match.group(2)
    return None


def _extra_list(exc: ValidationException) -> list[dict[str, Any]]:
    return (
        [e for e in (exc.extra or []) if isinstance(e, dict)] if isinstance(exc.extra, list) else []
    )


def on_validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    """Bad query parameters or a body of the wrong type: 422 naming the field; bad JSON: 400."""
    messages = [str(e.get("message")) for e in _extra_list(exc) if e.get("message")]
    detail = "; ".join(messages) or str(exc.detail)
    if "malformed" in detail.lower() or ("json" in str(exc.detail).lower() and "decode" in detail):
        return problem(400, "Bad request", "the request body is not valid JSON")
    return problem(422, "Invalid input", detail.replace("$.", ""), field=_validation_field(exc))


def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return problem(exc.status_code, _title(exc.status_code), str(exc.detail))


def on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(HTTP_500_INTERNAL_SERVER_ERROR, "Internal error", "an unexpected error occurred")


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


EXCEPTION_HANDLERS: dict[Any, Any] = {
    NbcronError: on_nbcron_error,
    ValidationException: on_validation_error,
    HTTPException: on_http_error,
    Exception: on_unexpected,
}
