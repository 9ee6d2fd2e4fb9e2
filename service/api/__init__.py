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
from service.api.keys import KeyController
from service.api.problems import EXCEPTION_HANDLERS
from service.api.runs import RunController
from service.api.security import OPEN_PATHS, KeyAuthMiddleware
from service.api.system import SystemController, health
from service.api.tasks import TaskController
from service.bootstrap import require_database_url
from service.config import Settings
from service.store import Store

MAX_BODY_BYTES = 1024 * 1024


def _store(state: State) -> Store:
    return state.store


def create_app(settings: Settings, *, store: Store | None = None) -> Litestar:
    """The API app; it opens (and closes) its own Store unless one is given."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        owned = store is None
        app.state.store = store or Store(
            require_database_url(settings),
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
        ).open(wait=False)
        try:
            yield
        finally:
            if owned:
                app.state.store.close()

    return Litestar(
        route_handlers=[health, TaskController, RunController, KeyController, SystemController],
        dependencies={"store": Provide(_store, sync_to_thread=False)},
        middleware=[DefineMiddleware(KeyAuthMiddleware, exclude=OPEN_PATHS)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[lifespan],
        state=State({"settings": settings}),
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
