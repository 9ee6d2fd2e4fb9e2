"""The Litestar app: one controller per resource, problem+json errors, key auth on every route."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from service import __version__
from service.api.artifacts import ArtifactController
from service.api.audit import AuditController
from service.api.auth_routes import AuthController
from service.api.keys import KeyController
from service.api.metrics_routes import ROUTES as METRICS_ROUTES
from service.api.problems import EXCEPTION_HANDLERS, correct_allow_header, document_problems
from service.api.reports import ReportController
from service.api.revocations import RevocationListener
from service.api.runs import RunController
from service.api.security import (
    KeyAuthMiddleware,
    add_safety_headers,
    cors_config,
    document_security,
    open_paths,
    security_state,
)
from service.api.system import SystemController, health
from service.api.tasks import TaskController
from service.bootstrap import require_database_url
from service.config import Settings, load_settings
from service.logging import configure_logging
from service.metrics import ApiMetrics, RequestMetrics
from service.store import Store
from service.tracing import TracingMiddleware, setup_tracing, store_class

MAX_BODY_BYTES = 1024 * 1024


def app_from_env() -> Litestar:
    """The app of one of several `nbcron api` processes (uvicorn's `workers` needs a factory):
    settings from the `NBCRON_*` environment the parent exported; logging and tracing set up
    in this process."""
    settings = load_settings()
    configure_logging(settings, role="api")
    setup_tracing(settings, role="api")
    return create_app(settings)


def _store(state: State) -> Store:
    return state.store


def create_app(settings: Settings, *, store: Store | None = None) -> Litestar:
    """The API app; it opens (and closes) its own Store unless one is given."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        owned = store is None
        app.state.store = store or store_class()(
            require_database_url(settings),
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
        ).open(wait=False)
        revocations = RevocationListener(app.state.store, app.state.principals).start()
        try:
            yield
        finally:
            revocations.stop()
            if owned:
                app.state.store.close()

    metrics = ApiMetrics(heartbeat_timeout=settings.heartbeat_timeout_seconds)
    return Litestar(
        route_handlers=[
            health,
            TaskController,
            RunController,
            ArtifactController,
            ReportController,
            KeyController,
            SystemController,
            *METRICS_ROUTES,
            AuthController,
            AuditController,
        ],
        dependencies={"store": Provide(_store, sync_to_thread=False)},
        middleware=[
            DefineMiddleware(RequestMetrics, metrics=metrics),
            DefineMiddleware(TracingMiddleware),
            DefineMiddleware(KeyAuthMiddleware, exclude=open_paths(settings)),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[lifespan],
        state=State({"settings": settings, "metrics": metrics, **security_state(settings)}),
        cors_config=cors_config(settings),
        before_send=[add_safety_headers, correct_allow_header],
        on_startup=[document_security, document_problems],
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(
            title="nbcron",
            version=__version__,
            description="Schedule shell commands, HTTP calls and notebooks. Send your key as "
            "`Authorization: Bearer <key>`.",
            path="/schema",
            render_plugins=[SwaggerRenderPlugin()],
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(type="http", scheme="bearer"),
                    "apiKey": SecurityScheme(
                        type="apiKey", name="X-API-Key", security_scheme_in="header"
                    ),
                }
            ),
            security=[{"bearer": []}, {"apiKey": []}],
        ),
        debug=False,
    )
