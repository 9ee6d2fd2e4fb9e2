"""The Panel app: one page per browser session, routed by query (`?task=NAME`, `?run=ID`), behind
the key login of dashboards.web, refreshed in place every few seconds.

`serve_dashboard(settings)` is the body of `nbcron dashboard`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import panel as pn

from dashboards.data import WINDOWS, Filters
from dashboards.render import esc, html_pane
from dashboards.views import OverviewView, RunView, TaskView
from dashboards.web import COOKIE, LOGOUT_URL, KeyAuthProvider, WebContext, extra_routes
from service.auth import Principal, authenticate
from service.bootstrap import require_database_url
from service.config import Settings
from service.errors import AuthError, NbcronError
from service.store import Store

REFRESH_MS = 3000
log = logging.getLogger(__name__)


class View(Protocol):
    """A page body: a layout and a way to bring it up to date."""

    title: str
    layout: Any

    def refresh(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class Visitor:
    """Who is looking, and how to check again that their key still holds."""

    principal: Principal
    key: str
    ctx: WebContext
    remote: str | None

    def authorize(self) -> Principal | None:
        """The key's principal right now (None once revoked)."""
        return self.ctx.check(self.key)


def query_args() -> dict[str, str]:
    """The page's query string, first value of each argument."""
    return {k: v[0].decode(errors="replace") for k, v in pn.state.session_args.items() if v}


def remote_address() -> str | None:
    """The visitor's address, for the audit log."""
    context = pn.state.curdoc.session_context if pn.state.curdoc else None
    request = getattr(getattr(context, "request", None), "_request", None)
    return getattr(request, "remote_ip", None)


def filters_from(args: dict[str, str]) -> Filters:
    """Overview filters from the query string (`?status=failed&tag=etl&hours=168`)."""
    hours = int(args["hours"]) if args.get("hours", "").isdigit() else 24
    return Filters(
        task=args.get("filter_task") or None,
        status=args.get("status") or None,
        tag=args.get("tag") or None,
        hours=hours if hours in WINDOWS.values() else 24,
    )


def route(store: Store, settings: Settings, visitor: Visitor, args: dict[str, str]) -> View:
    """The view the query string asks for (overview by default)."""
    if args.get("run", "").isdigit():
        return RunView(store, int(args["run"]))
    if args.get("task"):
        return TaskView(
            store,
            store.get_task(args["task"]),
            principal=visitor.principal,
            authorize=visitor.authorize,
            remote=visitor.remote,
        )
    return OverviewView(
        store, filters=filters_from(args), heartbeat_timeout=settings.heartbeat_timeout_seconds
    )


class Page:
    """Header, status line and one view; `refresh` is the periodic callback."""

    def __init__(self, view: View, visitor: Visitor) -> None:
        self.view, self.visitor = view, visitor
        who = visitor.principal
        self.header = html_pane(
            '<div class="header"><a class="brand" href="/">nbcron</a>'
            f'<a href="/" id="nav-overview">Overview</a><span class="grow"></span>'
            f'<span id="whoami">{esc(who.name)} ({esc(who.role.value)})</span>'
            f'<a href="{LOGOUT_URL}" id="logout">Log out</a></div>'
        )
        self.status = html_pane()
        self.layout = pn.Column(
            self.header, self.status, view.layout, sizing_mode="stretch_width", max_width=1400
        )

    def refresh(self) -> None:
        """Check the key again, then update the view; failures become a status line."""
        if self.visitor.authorize() is None:
            self.layout[:] = [
                html_pane(
                    '<p class="notice error">Your key is no longer valid. '
                    '<a href="/login">Log in again</a>.</p>'
                )
            ]
            return
        try:
            self.view.refresh()
        except NbcronError as exc:
            self.status.object = f'<p class="notice error" id="refresh-error">{esc(exc)}</p>'
            return
        stamp = datetime.now(UTC).strftime("%H:%M:%S")
        every = REFRESH_MS // 1000
        self.status.object = (
            f'<p class="muted" id="refreshed">Updated {stamp} UTC · refreshes every {every} s</p>'
        )


def session_page(store: Store, settings: Settings, ctx: WebContext) -> Any:
    """The page for one browser session (the auth provider already let it in)."""
    found = ctx.login(pn.state.cookies.get(COOKIE))
    if found is None:
        return html_pane('<p>You are not logged in. <a href="/login">Log in</a>.</p>')
    visitor = Visitor(principal=found[0], key=found[1], ctx=ctx, remote=remote_address())
    try:
        page = Page(route(store, settings, visitor, query_args()), visitor)
    except NbcronError as exc:  # no such task, or the database is away
        return html_pane(f'<p class="notice error">{esc(exc)} · <a href="/">Overview</a></p>')
    page.refresh()
    pn.state.add_periodic_callback(page.refresh, period=REFRESH_MS)
    return page.layout


def make_app(store: Store, settings: Settings, ctx: WebContext) -> Callable[[], Any]:
    """The Panel app function (one call per browser session)."""
    return lambda: session_page(store, settings, ctx)


def credential_resolver(store: Store, settings: Settings) -> Callable[[str], Principal]:
    """API keys and the API's short-lived tokens, checked exactly as the API checks them."""
    from service.tokens import jwt_secret, looks_like_jwt, resolve

    def check(credential: str) -> Principal:
        if not looks_like_jwt(credential):
            return authenticate(store, credential)
        try:
            secret = jwt_secret(settings)
        except ValueError as exc:  # a misconfigured secret refuses tokens, it does not crash
            raise AuthError(str(exc)) from exc
        return resolve({"store": store, "jwt_secret": secret}, credential)

    return check


def serve_dashboard(settings: Settings, *, port: int | None = None) -> None:
    """Serve the dashboard on settings.dashboard_port until interrupted (`nbcron dashboard`)."""
    port = port or settings.dashboard_port
    host = settings.api_host
    secret = secrets.token_urlsafe(32)  # sessions live as long as this process
    store = Store(require_database_url(settings), min_size=1, max_size=settings.db_pool_max)
    store.open(wait=False)
    ctx = WebContext(store=store, secret=secret, resolve=credential_resolver(store, settings))
    # Bound to every interface, visitors may come by any name; the SameSite=Strict session
    # cookie is what keeps other sites' pages off the websocket.
    everywhere = host in ("", "0.0.0.0", "::")
    origins = {"*"} if everywhere else {f"{h}:{port}" for h in (host, "localhost", "127.0.0.1")}
    log.info("dashboard on http://%s:%s/", host, port)
    try:
        pn.serve(
            make_app(store, settings, ctx),
            port=port,
            address=host,
            show=False,
            title="nbcron",
            websocket_origin=sorted(origins),
            cookie_secret=secret,
            auth_provider=KeyAuthProvider(ctx),
            extra_patterns=extra_routes(ctx),
        )
    finally:
        store.close()
