"""Support for the executor integration tests: one real stack per module, real loopback servers.

A module-scoped stack (API, dispatcher, worker on a fresh database cloned from the template and
its own Redis namespace) keeps the executor suites fast: the worker's warm kernel pool and the
processes are started once per module instead of once per test.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from service.auth import ensure_admin_key
from service.config import Settings
from service.store import Store
from tests.support import REDIS_URL, Stack, clear_namespace, free_port, fresh_database, wait_run


@contextmanager
def module_stack(
    template_db: str,
    folder: Path,
    *,
    roles: tuple[str, ...] = ("dispatcher", "worker"),
    **overrides: Any,
) -> Iterator[Stack]:
    """API (+ roles) on a fresh database and namespace, with settings overrides."""
    namespace = f"nbtest-{uuid.uuid4().hex[:10]}"
    env = overrides.pop("env", {})
    with fresh_database(template_db) as url:
        port = free_port()
        settings = Settings(
            database_url=url,
            broker_url=REDIS_URL,
            broker_namespace=namespace,
            data_dir=folder / "data",
            api_port=port,
            api_url=f"http://127.0.0.1:{port}",
            heartbeat_interval_seconds=1.0,
            heartbeat_timeout_seconds=6.0,
            poll_interval_seconds=0.5,
            **overrides,
        )
        with Store(url, min_size=1, max_size=2) as store:
            ensure_admin_key(store, settings.admin_key_path)
        stack = Stack(
            settings=settings, key=settings.admin_key_path.read_text().strip(), logs=folder
        )
        try:
            stack.start("api", **env)
            stack.wait_healthy()
            for role in roles:
                stack.start(role, **env)
            yield stack
        finally:
            stack.stop_all()
            clear_namespace(namespace)


def run_task(
    api: httpx.Client, body: dict[str, Any], *, timeout: float = 60, **trigger: Any
) -> dict[str, Any]:
    """Create a task, trigger it once and wait for the run to end."""
    created = api.post("/api/tasks", json=body)
    assert created.status_code == 201, created.text
    triggered = api.post(f"/api/tasks/{body['name']}/trigger", json=trigger or None)
    assert triggered.status_code == 202, triggered.text
    return wait_run(api, triggered.json()["id"], timeout=timeout)


def log_text(api: httpx.Client, run_id: int) -> str:
    return str(api.get(f"/api/runs/{run_id}/logs").json()["text"])


def artifact(api: httpx.Client, run_id: int, name: str) -> httpx.Response:
    response = api.get(f"/api/runs/{run_id}/artifacts/{name}")
    assert response.status_code == 200, response.text
    return response


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class LoopbackServer:
    """A real HTTP server on a loopback address, recording every request it gets."""

    host: str = "127.0.0.1"
    hits: list[Hit] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def base(self) -> str:
        assert self.server is not None
        return f"http://{self.host}:{self.server.server_address[1]}"

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def start(self) -> LoopbackServer:
        self.server = _QuietServer((self.host, 0), _handler(self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def paths(self) -> list[str]:
        return [h.path for h in self.hits]


class _QuietServer(ThreadingHTTPServer):
    """Clients that hang up early (a capped body, a cancelled run) are not errors here."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        return None


def _handler(owner: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return None

        def _route(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            owner.hits.append(Hit(self.command, self.path, dict(self.headers.items()), body))
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            route = ROUTES.get(url.path, _not_found)
            status, headers, payload = route(self.command, query, body, dict(self.headers.items()))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _route

    return Handler


Reply = tuple[int, dict[str, str], bytes]


def _not_found(method: str, query: dict[str, str], body: bytes, headers: dict[str, str]) -> Reply:
    return 404, {"content-type": "text/plain"}, b"no such route"


def _ok(method: str, query: dict[str, str], body: bytes, headers: dict[str, str]) -> Reply:
    return (
        200,
        {"content-type": "text/plain; charset=utf-8", "x-probe": "nbcron"},
        b"hello from loopback",
    )


def _echo(method: str, query: dict[str, str], body: bytes, headers: dict[str, str]) -> Reply:
    record = {
        "method": method,
        "body": body.decode(),
        "headers": {k.lower(): v for k, v in headers.items()},
    }
    return 200, {"content-type": "application/json"}, json.dumps(record).encode()


def _status(method: str, query: dict[str, str], body: bytes, headers: dict[str, str]) -> Reply:
    return int(query.get("code", "500")), {"content-type": "text/plain"}, b"status body"


def _big(method: str, query: dict[str, str], body: bytes, headers: dict[str, str]) -> Reply:
    size = int(query.get("size", str(3 * 1024 * 1024)))
    return 200, {"content-type": "text/plain"}, b"x" * (size - 3) + b"END"


def _redirect(method: str, query: dict[str, str], body: bytes, headers: dict[str, str]) -> Reply:
    return 302, {"location": query["to"], "content-type": "text/plain"}, b"moved"


def _slow(method: str, query: dict[str, str], body: bytes, headers: dict[str, str]) -> Reply:
    time.sleep(float(query.get("seconds", "10")))
    return 200, {"content-type": "text/plain"}, b"late"


ROUTES = {
    "/ok": _ok,
    "/echo": _echo,
    "/status": _status,
    "/big": _big,
    "/redirect": _redirect,
    "/slow": _slow,
}
