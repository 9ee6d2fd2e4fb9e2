"""RFC 9457 problem+json responses for every error the API returns."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from litestar import Litestar, Request, Response
from litestar.datastructures import MutableScopeHeaders
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.spec import (
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Schema,
)
from litestar.routes import HTTPRoute
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import Message, Scope

from service.errors import NbcronError

log = logging.getLogger("nbcron.api")
PROBLEM_JSON = "application/problem+json"
_FIELD_RE = re.compile(r"(?:unknown|missing required) field `([^`]+)`|`\$\.([^`\[]+)")


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> Response[dict[str, Any]]:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    out = dict(headers or {}) | ({"WWW-Authenticate": "Bearer"} if status == 401 else {})
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=out or None)


def on_nbcron_error(request: Request[Any, Any, Any], exc: NbcronError) -> Response[Any]:
    if exc.status_code >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc.detail)
    headers = getattr(exc, "headers", None)  # e.g. Retry-After on 429
    return problem(exc.status_code, exc.title, exc.detail, headers=headers, **exc.extra)


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
    """Litestar's own errors (404, 405 with Allow, 413 ...) as problem+json, headers kept."""
    detail = str(exc.detail)
    if exc.status_code == 413:
        detail = "the request body is larger than the 1 MiB limit"
    return problem(exc.status_code, _title(exc.status_code), detail, headers=exc.headers)


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


# -- the OpenAPI document: every error a route can answer, as problem+json ----------------

PROBLEM_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    required=["type", "title", "status", "detail"],
    properties={
        "type": Schema(type=OpenAPIType.STRING),
        "title": Schema(type=OpenAPIType.STRING),
        "status": Schema(type=OpenAPIType.INTEGER),
        "detail": Schema(type=OpenAPIType.STRING),
        "field": Schema(type=[OpenAPIType.STRING, OpenAPIType.NULL]),
    },
    description="RFC 9457 problem details",
)
NO_NUL = "^[^\\x00]*$"
REPORT_503 = frozenset({"systemHealth"})  # its 503 is the health report itself, not a problem
_WRITES = ("post", "patch", "put", "delete")
_METHODS = ("get", *_WRITES)


def _problem_response(status: int, *, retry_after: bool = False) -> OpenAPIResponse:
    headers = None
    if retry_after:
        headers = {
            "Retry-After": OpenAPIHeader(
                schema=Schema(type=OpenAPIType.INTEGER), required=True, description="seconds"
            )
        }
    return OpenAPIResponse(
        description=_title(status),
        headers=headers,
        content={PROBLEM_JSON: OpenAPIMediaType(schema=PROBLEM_SCHEMA)},
    )


def error_statuses(path: str, method: str, operation: Operation) -> list[int]:
    """The error statuses an operation can answer."""
    if operation.security == []:  # open routes (/health) have no input and need no key
        return []
    statuses = [401, 403, 429, 503]
    if operation.parameters or operation.request_body:
        statuses += [400, 422]
    if operation.request_body:
        statuses.append(413)
    if "{" in path or any(
        getattr(p, "param_in", None) == "query" for p in operation.parameters or []
    ):
        statuses.append(404)  # unknown id, or a filter naming an unknown object
    if method in _WRITES:
        statuses.append(409)
    return sorted(set(statuses))


def document_problems(app: Litestar) -> None:
    """on_startup: make the OpenAPI document say what the API really answers.

    Errors are problem+json (not Litestar's default shape); request structs are closed to
    unknown fields; OPTIONS answers list every method of a path.
    """
    openapi = app.openapi_schema  # built once and cached; served from this object
    for path, item in (openapi.paths or {}).items():
        for method in _METHODS:
            operation: Operation | None = getattr(item, method, None)
            if operation is not None:
                _document_errors(path, method, operation)
                for parameter in operation.parameters or []:
                    if parameter.param_in in ("query", "path"):
                        _no_nul(parameter.schema)
    _closed_request_bodies(openapi)
    app.state.allow = {
        route.path_format: ", ".join(sorted(route.methods))
        for route in app.routes
        if isinstance(route, HTTPRoute)
    }


def _document_errors(path: str, method: str, operation: Operation) -> None:
    responses = operation.responses or {}
    kept = {k: v for k, v in responses.items() if k[0] in "123"}
    errors = {
        str(s): _problem_response(s, retry_after=s == 429)
        for s in error_statuses(path, method, operation)
    }
    if operation.operation_id in REPORT_503 and "200" in responses:
        errors["503"] = responses["200"]  # a degraded report, same shape as the healthy one
    operation.responses = kept | errors


def _closed_request_bodies(openapi: Any) -> None:
    """Request structs refuse unknown fields (forbid_unknown_fields): say so in the document."""
    schemas = openapi.components.schemas or {}
    for item in (openapi.paths or {}).values():
        for method in _WRITES:
            body = getattr(getattr(item, method, None), "request_body", None)
            for media in (getattr(body, "content", None) or {}).values():
                for part in [media.schema, *(getattr(media.schema, "one_of", None) or [])]:
                    ref = getattr(part, "ref", "") or ""
                    target = schemas.get(ref.rsplit("/", 1)[-1])
                    if isinstance(target, Schema) and target.properties:
                        target.additional_properties = False
                        for prop in target.properties.values():
                            _no_nul(prop)


def _no_nul(schema: Any) -> None:
    """Postgres text cannot hold NUL: say so on string fields and parameters without a pattern."""
    kinds = [schema, *(getattr(schema, "one_of", None) or [])]
    is_text = any(getattr(k, "type", None) == OpenAPIType.STRING for k in kinds)
    if isinstance(schema, Schema) and is_text and schema.pattern is None and not schema.enum:
        schema.pattern = NO_NUL


async def correct_allow_header(message: Message, scope: Scope) -> None:
    """before_send hook: Litestar's automatic OPTIONS answer can list only the methods of the
    first handler registered on a path; answer with all of them."""
    if message["type"] != "http.response.start" or scope.get("method") != "OPTIONS":
        return
    headers = MutableScopeHeaders.from_message(message)
    allow = getattr(scope["app"].state, "allow", {}).get(scope.get("path_template"))
    if "allow" in headers and allow:
        headers["allow"] = allow
