"""`nbcron up`: embedded servers when no URLs are set, then every role as a supervised child."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import psutil

from service.config import Settings, settings_env
from service.embedded import (
    EmbeddedPostgres,
    EmbeddedServerError,
    EmbeddedValkey,
    die_with_parent,
    port_is_free,
)

ROLE_STOP_GRACE = 10.0
HEALTH_TIMEOUT = 60.0
POLL_SECONDS = 0.2


class _StopRequested(BaseException):  # like KeyboardInterrupt
    """Raised by the SIGINT/SIGTERM handler to unwind to the shutdown path."""


class _Signals:
    """SIGINT/SIGTERM handlers that raise once, then stay quiet while we shut down."""

    def __init__(self) -> None:
        self.stopping = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            self.stopping = True
            raise _StopRequested(signum)


@dataclass
class _Role:
    name: str
    proc: subprocess.Popen[bytes]


@dataclass
class _Stack:
    """Everything `nbcron up` started; stopped roles first, then Valkey, then PostgreSQL."""

    postgres: EmbeddedPostgres | None = None
    valkey: EmbeddedValkey | None = None
    roles: list[_Role] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent()
        )
        self.roles.append(_Role(name, proc))

    def exited(self) -> _Role | None:
        """The first role whose process has ended, if any."""
        return next((role for role in self.roles if role.proc.poll() is not None), None)

    def stop(self) -> None:
        self._stop_roles()
        for server in (self.valkey, self.postgres):
            if server is not None:
                server.stop()

    def _stop_roles(self) -> None:
        """SIGTERM every role, wait up to ROLE_STOP_GRACE, then SIGKILL them and their children."""
        descendants = _descendants([r.proc.pid for r in self.roles if r.proc.poll() is None])
        for role in self.roles:
            if role.proc.poll() is None:
                role.proc.terminate()
        deadline = time.monotonic() + ROLE_STOP_GRACE
        for role in self.roles:
            try:
                role.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"nbcron: {role.name} did not stop in time; killing it", file=sys.stderr)
                role.proc.kill()
                role.proc.wait()
        for proc in descendants:  # grandchildren a role left behind
            with contextlib.suppress(psutil.Error):
                proc.kill()


def _descendants(pids: list[int]) -> list[psutil.Process]:
    found: list[psutil.Process] = []
    for pid in pids:
        try:
            found.extend(psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            continue
    return found


def _client_host(host: str) -> str:
    """The address to reach a server bound to `host` from this machine."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(
        host, f"[{host}]" if ":" in host else host
    )


def _dashboard_available() -> bool:
    try:
        return importlib.util.find_spec("dashboards.app") is not None
    except ModuleNotFoundError:
        return False


def _busy_port_message(settings: Settings, with_dashboard: bool) -> str | None:
    """A one-line complaint if a port we must listen on is taken, else None."""
    if not port_is_free(settings.api_port, settings.api_host):
        hint = "set --port or NBCRON_API_PORT"
        return f"nbcron: port {settings.api_port} is already in use ({hint})"
    if with_dashboard and not port_is_free(settings.dashboard_port, settings.api_host):
        hint = "set --dashboard-port or NBCRON_DASHBOARD_PORT"
        return f"nbcron: port {settings.dashboard_port} is already in use ({hint})"
    return None


def _start_servers(settings: Settings, stack: _Stack) -> Settings:
    """Start embedded PostgreSQL/Valkey for the URLs not given; returns settings with all URLs."""
    if settings.database_url is None:
        print("nbcron: starting embedded PostgreSQL…", file=sys.stderr, flush=True)
        stack.postgres = EmbeddedPostgres(settings.data_dir)
        settings = settings.with_overrides(database_url=stack.postgres.start())
    if settings.broker_url is None:
        print("nbcron: starting embedded Valkey…", file=sys.stderr, flush=True)
        stack.valkey = EmbeddedValkey(settings.data_dir)
        settings = settings.with_overrides(broker_url=stack.valkey.start())
    return settings


def _role_names(settings: Settings, with_dashboard: bool) -> list[tuple[str, str]]:
    """(display name, `nbcron` sub-command) for every role child."""
    roles = [("api", "api"), ("dispatcher", "dispatcher")]
    roles += [(f"worker-{n}", "worker") for n in range(1, settings.worker_processes + 1)]
    if with_dashboard:
        roles.append(("dashboard", "dashboard"))
    return roles


def _start_roles(settings: Settings, stack: _Stack, with_dashboard: bool) -> None:
    env = {**os.environ, **settings_env(settings)}
    for name, command in _role_names(settings, with_dashboard):
        stack.spawn(name, [sys.executable, "-m", "service.cli", command], env)


def _describe_exit(role: _Role) -> str:
    code = role.proc.returncode
    if code is not None and code < 0:
        return f"{role.name} (pid {role.proc.pid}) was killed by {signal.Signals(-code).name}"
    return f"{role.name} (pid {role.proc.pid}) exited with code {code}"


def _health_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _wait_healthy(settings: Settings, stack: _Stack) -> str | None:
    """Wait for the API's /health; returns an error line if a role died or time ran out."""
    url = f"http://{_client_host(settings.api_host)}:{settings.api_port}/health"
    deadline = time.monotonic() + HEALTH_TIMEOUT
    while not _health_ok(url):
        dead = stack.exited()
        if dead is not None:
            return f"nbcron: {_describe_exit(dead)} during start-up"
        if time.monotonic() > deadline:
            return f"nbcron: the API did not answer {url} within {HEALTH_TIMEOUT:.0f} s"
        time.sleep(POLL_SECONDS)
    return None


def _banner(settings: Settings, stack: _Stack, with_dashboard: bool) -> str:
    host = _client_host(settings.api_host)
    api = f"http://{host}:{settings.api_port}"
    dashboard = f"http://{host}:{settings.dashboard_port}/" if with_dashboard else "not installed"
    key = settings.admin_key_path
    database = f"embedded PostgreSQL ({stack.postgres.pgdata})" if stack.postgres else "external"
    broker = "embedded Valkey" if stack.valkey else "external"
    return "\n".join(
        [
            "nbcron is up",
            f"  API        {api}",
            f"  API docs   {api}/schema/swagger",
            f"  Dashboard  {dashboard}",
            f"  Admin key  {key}  (send it as: Authorization: Bearer $(cat {key}))",
            f"  Database   {database}",
            f"  Broker     {broker}",
            "Press Ctrl-C to stop.",
        ]
    )


def _supervise(stack: _Stack) -> int:
    """Block until a role exits on its own (returns 1); a signal unwinds via _StopRequested."""
    while True:
        dead = stack.exited()
        if dead is not None:
            print(f"nbcron: {_describe_exit(dead)} unexpectedly; stopping", file=sys.stderr)
            return 1
        time.sleep(POLL_SECONDS)


def _run(settings: Settings, stack: _Stack, with_dashboard: bool) -> int:
    from service.bootstrap import prepare

    settings = _start_servers(settings, stack)
    api_url = f"http://{_client_host(settings.api_host)}:{settings.api_port}"
    settings = settings.with_overrides(api_url=api_url)  # children talk to this stack's API
    prepare(settings)
    _start_roles(settings, stack, with_dashboard)
    failure = _wait_healthy(settings, stack)
    if failure is not None:
        print(failure, file=sys.stderr)
        return 1
    print(_banner(settings, stack, with_dashboard), flush=True)
    return _supervise(stack)


def run_up(settings: Settings) -> int:
    """The body of `nbcron up`: start everything, print where it is, stop it all on Ctrl-C."""
    settings = settings.with_overrides(data_dir=settings.data_dir.expanduser().resolve())
    with_dashboard = _dashboard_available()
    busy = _busy_port_message(settings, with_dashboard)
    if busy is not None:
        print(busy, file=sys.stderr)
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    stack = _Stack()
    signals = _Signals()
    signals.install()
    try:
        return _run(settings, stack, with_dashboard)
    except _StopRequested:
        return 0
    except EmbeddedServerError as exc:
        print(f"nbcron: {exc}", file=sys.stderr)
        return 1
    finally:
        signals.stopping = True
        stack.stop()
        print("nbcron stopped", flush=True)
        signals.restore()


__all__ = ["run_up"]
