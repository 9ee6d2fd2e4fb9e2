"""Test support: real Postgres template databases, Redis namespaces, and a real process stack."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from service.config import Settings, settings_env
from service.migrate import MIGRATIONS_DIR, migrate
from service.models import Task

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("NBCRON_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("NBCRON_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TERMINAL = {"succeeded", "failed", "timed_out", "cancelled", "missed"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def db_url(name: str) -> str:
    return PG_URL.rsplit("/", 1)[0] + "/" + name


def require_servers() -> None:
    """Fail (never skip) when the real Postgres or Redis is not reachable."""
    try:
        psycopg.connect(PG_URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        raise RuntimeError(f"PostgreSQL is not reachable at {PG_URL}: {exc}") from exc
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        raise RuntimeError(f"Redis is not reachable at {REDIS_URL}: {exc}") from exc


def template_name() -> str:
    """A template database per migration content, so an edited schema gets a fresh one."""
    digest = hashlib.sha256()
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        digest.update(path.read_bytes())
    return f"nbcron_tpl_{digest.hexdigest()[:12]}"


def ensure_template() -> str:
    name = template_name()
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(4242)")
        try:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')
                migrate(db_url(name))
        finally:
            conn.execute("SELECT pg_advisory_unlock(4242)")
    return name


@contextmanager
def fresh_database(template: str) -> Iterator[str]:
    """A database cloned from the migrated template, dropped afterwards."""
    name = f"nbcron_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield db_url(name)
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def clear_namespace(namespace: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{namespace}*", count=1000))
    if keys:
        client.delete(*keys)


@dataclass
class Stack:
    """API, dispatcher and worker processes for one test database and broker namespace."""

    settings: Settings
    key: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: Path | None = None

    @property
    def base(self) -> str:
        return self.settings.api_url

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NBCRON_")}
        env.update(settings_env(self.settings))
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def start(self, role: str, *args: str, name: str | None = None, **extra_env: str) -> None:
        assert self.logs is not None
        label = name or role
        out = (self.logs / f"{label}.log").open("ab")
        self.procs[label] = subprocess.Popen(
            [sys.executable, "-m", "service.cli", role, *args],
            cwd=ROOT,
            env=self.env(**extra_env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def stop(self, label: str, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        proc = self.procs.pop(label)
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def stop_all(self) -> None:
        for label in list(self.procs):
            self.stop(label)

    def log_text(self, label: str) -> str:
        assert self.logs is not None
        path = self.logs / f"{label}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if "api" in self.procs and self.procs["api"].poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"API did not become healthy:\n{self.log_text('api')}")

    def client(self, key: str | None = None) -> httpx.Client:
        token = self.key if key is None else key
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=30)


@contextmanager
def running_api(settings: Settings, key: str, logs: Path) -> Iterator[Stack]:
    """An API process on `settings`, healthy when the block starts, stopped after it."""
    stack = Stack(settings=settings, key=key, logs=logs)
    stack.start("api")
    try:
        stack.wait_healthy()
        yield stack
    finally:
        stack.stop_all()


def wait_run(client: httpx.Client, run_id: int, *, timeout: float = 30) -> dict[str, Any]:
    """Poll a run until it is terminal."""
    deadline = time.monotonic() + timeout
    while True:
        run = client.get(f"/api/runs/{run_id}").json()
        if run["status"] in TERMINAL:
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} still {run['status']} after {timeout}s: {run}")
        time.sleep(0.05)


def wait_for(predicate: Any, *, timeout: float = 30, interval: float = 0.1, what: str = "") -> Any:
    """Poll `predicate` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(interval)


def task_record(**overrides: Any) -> Task:
    """A stored task as the store returns it: every field given, defaults like a new shell task."""
    created = datetime(2026, 1, 1, tzinfo=UTC)
    values: dict[str, Any] = {
        "id": 1,
        "name": "task",
        "executor": "shell",
        "spec": {"command": "true"},
        "description": "",
        "tags": [],
        "schedule": None,
        "timezone": "UTC",
        "enabled": True,
        "timeout_seconds": None,
        "max_retries": 0,
        "retry_delay_seconds": 60,
        "depends_on": [],
        "misfire_policy": "run_once",
        "misfire_grace_seconds": 60,
        "max_catchup": 10,
        "overlap_policy": "allow",
        "queue": "default",
        "env": {},
        "notify": {},
        "keep_last": None,
        "next_fire_at": None,
        "created_at": created,
        "updated_at": created,
    }
    assert set(values) == set(Task.__struct_fields__)  # a new Task field must be added here
    return Task(**(values | overrides))


@contextmanager
def webhook_receiver(handle: Callable[[bytes], int]) -> Iterator[str]:
    """A real HTTP server on loopback; each POST body goes to `handle`, which gives the status."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            self.send_response(handle(self.rfile.read(length)))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
