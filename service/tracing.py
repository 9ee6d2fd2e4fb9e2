"""Optional OpenTelemetry tracing: one trace from the API request to the worker's execution.

Off by default (`NBCRON_TRACING_ENABLED=true` switches it on). It needs the `tracing` extra
(`pip install 'nbcron[tracing]'`); when those packages are missing, `setup_tracing` says so in one
log line and everything here stays a no-op. Spans are exported over OTLP/HTTP to
`tracing_endpoint` (or wherever the standard `OTEL_EXPORTER_OTLP_*` variables point).

How the trace crosses processes: the API's request span puts its W3C `traceparent` into a
transaction setting, and the `runs.traceparent` column defaults to it, so a run queued by the
request carries the request's trace. The dispatcher's `dispatch` span and the worker's
`execute run` span use it as their parent. Runs with no request behind them (cron slots,
retries) get the dispatcher's trace, so dispatch and execution still share one.
"""

from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from service.config import Settings
from service.store import Store

log = logging.getLogger("nbcron.tracing")
_state: dict[str, Any] = {}


def setup_tracing(settings: Settings, *, role: str) -> bool:
    """Install a tracer provider for this process when tracing is on; True when it is."""
    if not settings.tracing_enabled:
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        log.warning(
            "tracing_enabled is set but OpenTelemetry is not installed (%s); "
            "install nbcron[tracing] to export traces. Tracing stays off.",
            exc.name,
        )
        return False
    resource = Resource.create({"service.name": settings.tracing_service_name, "nbcron.role": role})
    provider = TracerProvider(resource=resource)
    exporter = (
        OTLPSpanExporter(endpoint=settings.tracing_endpoint)
        if settings.tracing_endpoint
        else OTLPSpanExporter()
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _state.update(provider=provider, tracer=provider.get_tracer("nbcron"))
    atexit.register(provider.shutdown)
    log.info("tracing on: %s spans exported over OTLP/HTTP", role)
    return True


def enabled() -> bool:
    """True once `setup_tracing` installed a provider in this process."""
    return "tracer" in _state


def shutdown() -> None:
    """Flush and stop the exporter (tests; atexit does it otherwise)."""
    provider = _state.pop("provider", None)
    _state.pop("tracer", None)
    if provider is not None:
        provider.shutdown()


def _parent(traceparent: str | None) -> Any:
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def current_traceparent() -> str | None:
    """The W3C traceparent of the active span, or None."""
    if not enabled():
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent")


@contextmanager
def span(
    name: str, *, traceparent: str | None = None, kind: str = "INTERNAL", **attributes: Any
) -> Iterator[Any]:
    """A span as the current one (None when tracing is off); exceptions are recorded on it."""
    tracer = _state.get("tracer")
    if tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    clean = {k: v for k, v in attributes.items() if v is not None}
    with tracer.start_as_current_span(
        name, context=_parent(traceparent), kind=SpanKind[kind], attributes=clean
    ) as current:
        yield current


def annotate(**attributes: Any) -> None:
    """Add attributes to the current span, if any."""
    if not enabled():
        return
    from opentelemetry import trace

    current = trace.get_current_span()
    for key, value in attributes.items():
        if value is not None:
            current.set_attribute(key, value)


# -- API ---------------------------------------------------------------------


class TracedStore(Store):
    """A Store whose transactions carry the current trace, so runs queued in them keep it."""

    @contextmanager
    def tx(self) -> Iterator[Any]:
        with super().tx() as tx:
            traceparent = current_traceparent()
            if traceparent:
                tx.one("set_traceparent", traceparent=traceparent)
            yield tx


def store_class() -> type[Store]:
    """TracedStore when tracing is on, else the plain Store."""
    return TracedStore if enabled() else Store


class TracingMiddleware:
    """ASGI middleware: a server span per request, continuing an incoming `traceparent`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not enabled():
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"traceparent", b"").decode() or None
        route = scope.get("path_template") or scope.get("path", "")
        name = f"{scope.get('method', '?')} {route}"

        async def traced_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                annotate(**{"http.response.status_code": message["status"]})
            await send(message)

        with span(
            name,
            traceparent=incoming,
            kind="SERVER",
            **{"http.request.method": scope.get("method"), "http.route": route},
        ):
            await self.app(scope, receive, traced_send)


# -- dispatcher and worker -------------------------------------------------


@contextmanager
def dispatch_spans(store: Store, claimed: list[dict[str, Any]]) -> Iterator[None]:
    """One `dispatch` span per claimed run around the send, parented on the run's trace."""
    tracer = _state.get("tracer")
    if tracer is None or not claimed:
        yield
        return
    rows = store.run_traceparents([r["id"] for r in claimed])
    spans = [_dispatch_span(tracer, store, row) for row in rows.values()]
    try:
        yield
    finally:
        end = time.time_ns()
        for current in spans:
            current.end(end_time=end)


def _dispatch_span(tracer: Any, store: Store, row: dict[str, Any]) -> Any:
    attributes = {"nbcron.run_id": row["id"], "nbcron.task_id": row["task_id"]}
    current = tracer.start_span(
        "dispatch run", context=_parent(row["traceparent"]), attributes=attributes
    )
    if not row["traceparent"]:
        from opentelemetry.trace import set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(current))
        store.adopt_traceparent(row["id"], carrier["traceparent"])
    return current


@contextmanager
def run_span(store: Store, claim: dict[str, Any]) -> Iterator[None]:
    """The worker's `execute run` span, in the trace of the request or slot that queued it."""
    if not enabled():
        yield
        return
    row = store.run_traceparents([claim["id"]]).get(claim["id"]) or {}
    with span(
        "execute run",
        traceparent=row.get("traceparent"),
        kind="CONSUMER",
        **{
            "nbcron.run_id": claim["id"],
            "nbcron.task_id": claim["task_id"],
            "nbcron.task": claim["task_name"],
            "nbcron.executor": claim["executor"],
            "nbcron.attempt": claim["attempt"],
        },
    ):
        yield
