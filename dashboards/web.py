"""The dashboard's doors: key login, sessions, logout and artifact downloads (Tornado handlers).

A visitor logs in with an API key; the key is checked with `service.auth.authenticate` and kept
on the server only. The browser gets a signed, HttpOnly cookie holding a random session id. Every
page load, websocket and artifact request authenticates that key again, so a revoked key locks
the dashboard out as it locks out the API.
"""

from __future__ import annotations

import asyncio
import html
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from string import Template
from typing import Any

from bokeh.server.auth_provider import AuthProvider
from tornado.web import RequestHandler, decode_signed_value

from dashboards import data
from service.auth import Principal, authenticate
from service.errors import AuthError
from service.store import Store

COOKIE = "nbcron_session"
SESSION_SECONDS = 12 * 3600
LOGIN_URL = "/login"
LOGOUT_URL = "/logout"
ARTIFACT_ROUTE = r"/artifacts/(\d+)/([A-Za-z0-9][A-Za-z0-9_.-]{0,199})"
LOGIN_ERRORS = {"invalid": "That key is not valid (wrong, revoked or mistyped)."}

LOGIN_PAGE = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>nbcron: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, sans-serif; background: #f4f6f8; margin: 0; }
main { max-width: 380px; margin: 12vh auto; background: #fff; padding: 2rem;
       border-radius: 8px; box-shadow: 0 1px 4px rgba(0,0,0,.15); }
h1 { margin-top: 0; font-size: 1.4rem; } label { display: block; margin: 1rem 0 .3rem; }
input[type=password] { width: 100%; box-sizing: border-box; padding: .5rem; font-size: 1rem; }
button { margin-top: 1rem; padding: .5rem 1.2rem; font-size: 1rem; background: #0f6cbd;
         color: #fff; border: 0; border-radius: 4px; cursor: pointer; }
.error { color: #b00020; } .hint { color: #666; font-size: .85rem; }
</style></head>
<body><main>
<h1>nbcron dashboard</h1>
<form method="post" action="$action">
$xsrf
<label for="key">API key or token</label>
<input type="password" id="key" name="key" autocomplete="current-password" required autofocus>
<input type="hidden" name="next" value="$next">
<p class="error" id="login-error">$error</p>
<button type="submit" id="login-button">Log in</button>
</form>
<p class="hint">Use the same key as for the API (<code>nbcron keys create</code>); the first admin key
is in the data directory's <code>admin-key</code> file.</p>
</main></body></html>
""")


@dataclass
class Sessions:
    """Logged-in browsers: session id (in the cookie) → API key (never sent to the browser)."""

    ttl: float = SESSION_SECONDS
    _keys: dict[str, tuple[str, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, key: str) -> str:
        """Remember `key` under a fresh random session id."""
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._expire()
            self._keys[sid] = (key, time.monotonic() + self.ttl)
        return sid

    def key(self, sid: str) -> str | None:
        """The key of a live session, or None."""
        with self._lock:
            self._expire()
            entry = self._keys.get(sid)
        return entry[0] if entry else None

    def close(self, sid: str) -> None:
        with self._lock:
            self._keys.pop(sid, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, (_, until) in self._keys.items() if until < now]:
            del self._keys[sid]


Resolver = Callable[[str], Principal]


@dataclass(frozen=True, kw_only=True)
class WebContext:
    """What the handlers and the Panel sessions share: the store, the sessions, the secret.

    `resolve` turns a credential into a principal or raises AuthError; by default it accepts
    API keys (`service.auth.authenticate`); `serve_dashboard` also lets the API's tokens in.
    """

    store: Store
    secret: str
    resolve: Resolver | None = None
    sessions: Sessions = field(default_factory=Sessions)

    def sid(self, signed: str | bytes | None) -> str | None:
        """The session id inside a signed cookie value, or None when absent or forged."""
        if not signed:
            return None
        value = decode_signed_value(self.secret, COOKIE, signed, max_age_days=1)
        return value.decode() if value else None

    def login(self, signed: str | bytes | None) -> tuple[Principal, str] | None:
        """The principal and key behind a signed session cookie, checked against the store now."""
        sid = self.sid(signed)
        key = self.sessions.key(sid) if sid else None
        principal = self.check(key) if key else None
        return (principal, key) if principal and key else None

    def check(self, credential: str) -> Principal | None:
        """The principal of a key (or token) right now; None when it is bad, expired or revoked."""
        try:
            if self.resolve is not None:
                return self.resolve(credential)
            return authenticate(self.store, credential)
        except AuthError:
            return None


def safe_next(target: str | None) -> str:
    """A same-site path to go to after login (never another host)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target


class _Handler(RequestHandler):
    """A handler that knows the WebContext."""

    ctx: WebContext

    def initialize(self, ctx: WebContext) -> None:
        self.ctx = ctx

    def principal(self) -> Principal | None:
        found = self.ctx.login(self.get_cookie(COOKIE))
        return found[0] if found else None

    def set_default_headers(self) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "same-origin")


class LoginHandler(_Handler):
    """GET: the login form. POST: check the key, open a session, go where the visitor was going."""

    def get(self) -> None:
        error = LOGIN_ERRORS.get(self.get_argument("error", ""), "")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Cache-Control", "no-store")
        self.write(
            LOGIN_PAGE.substitute(
                action=LOGIN_URL,
                xsrf=self.xsrf_form_html(),
                next=html.escape(safe_next(self.get_argument("next", "/"))),
                error=html.escape(error),
            )
        )

    def post(self) -> None:
        self.check_xsrf_cookie()
        key = self.get_body_argument("key", "").strip()
        if not key or self.ctx.check(key) is None:
            self.redirect(f"{LOGIN_URL}?error=invalid")
            return
        sid = self.ctx.sessions.open(key)
        self.set_signed_cookie(COOKIE, sid, expires_days=None, httponly=True, samesite="Strict")
        self.redirect(safe_next(self.get_body_argument("next", "/")))


class LogoutHandler(_Handler):
    """Forget the session and show the login form again."""

    def get(self) -> None:
        sid = self.ctx.sid(self.get_cookie(COOKIE))
        if sid:
            self.ctx.sessions.close(sid)
        self.clear_cookie(COOKIE)
        self.redirect(LOGIN_URL)


class ArtifactHandler(_Handler):
    """An artifact's bytes for a logged-in visitor; `?download=1` saves it instead of showing it."""

    def get(self, run_id: str, name: str) -> None:
        if self.principal() is None:
            self.set_status(403)
            self.finish("log in first")
            return
        found = data.artifact(self.ctx.store, int(run_id), name)
        if found is None:
            self.set_status(404)
            self.finish("no such artifact")
            return
        content_type, body = found
        self.set_header("Content-Type", content_type)
        # The report is the notebook's own HTML: never let it run as this site.
        self.set_header("Content-Security-Policy", "sandbox allow-scripts")
        if self.get_argument("download", ""):
            self.set_header("Content-Disposition", f'attachment; filename="{name}"')
        self.finish(body)


class KeyAuthProvider(AuthProvider):
    """Bokeh/Panel auth hooks: no page and no websocket without a live session."""

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx
        super().__init__()

    @property
    def get_user_async(self) -> Callable[[Any], Any]:
        async def get_user(handler: RequestHandler) -> str | None:
            found = await asyncio.to_thread(self.ctx.login, handler.get_cookie(COOKIE))
            return found[0].name if found else None

        return get_user

    @property
    def login_url(self) -> str:
        return LOGIN_URL

    @property
    def login_handler(self) -> type[RequestHandler]:
        return LoginHandler

    @property
    def logout_url(self) -> str:
        return LOGOUT_URL

    @property
    def logout_handler(self) -> type[RequestHandler]:
        return LogoutHandler

    @property
    def endpoints(self) -> list[Any]:
        """Login and logout routes, handed the shared context."""
        init = {"ctx": self.ctx}
        return [(LOGIN_URL, LoginHandler, init), (LOGOUT_URL, LogoutHandler, init)]


def extra_routes(ctx: WebContext) -> list[tuple[str, type[RequestHandler], dict[str, Any]]]:
    """Routes served next to the Panel app."""
    return [(ARTIFACT_ROUTE, ArtifactHandler, {"ctx": ctx})]
