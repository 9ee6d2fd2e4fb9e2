"""Helpers for the dashboard's browser tests: Debian's Chromium through Playwright, a real
`nbcron dashboard` process, login, console-error watching and screenshots."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, sync_playwright

from service.auth import create_key
from service.models import Role, Task, TaskFields
from service.store import Store
from service.tasks import task_values
from tests.support import ROOT, Stack, free_port

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
XSS = "<img src=x onerror=alert(1)>"


def chromium_path() -> str:
    """Debian's Chromium; a missing browser fails the test (it never skips, in CI or not)."""
    found = os.environ.get("NBCRON_TEST_CHROMIUM") or next(
        (p for p in CHROMIUM_CANDIDATES if Path(p).exists()), shutil.which("chromium")
    )
    if not found:
        raise AssertionError(
            "Chromium is needed for the dashboard tests: apt-get install -y chromium"
            " (or set NBCRON_TEST_CHROMIUM to its path)"
        )
    return found


@contextmanager
def launch_browser() -> Iterator[Browser]:
    """A headless Chromium for the whole module."""
    with sync_playwright() as pw:
        browser = _launch(pw)
        try:
            yield browser
        finally:
            browser.close()


def _launch(pw: Playwright) -> Browser:
    return pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, timeout=30_000)


@dataclass
class Watch:
    """Console errors, uncaught page errors and dialogs (alert) seen by one page."""

    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> Page:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("dialog", self._dialog)
        return page

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()


def start_dashboard(stack: Stack) -> str:
    """Start `nbcron dashboard` on a free port as part of `stack`; its base URL once it answers."""
    port = free_port()
    stack.start("dashboard", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/login", timeout=1).status_code == 200:
                return base
        except httpx.TransportError:
            pass
        proc = stack.procs["dashboard"]
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"dashboard did not start:\n{stack.log_text('dashboard')}")


def login(page: Page, base: str, key: str) -> None:
    """Log in through the form and wait for the first refresh of the page."""
    page.goto(base + "/login")
    page.fill("#key", key)
    page.click("#login-button")
    page.wait_for_url(base + "/")
    wait_text(page, "#refreshed", "Updated")


def wait_text(page: Page, selector: str, text: str, *, timeout: float = 20_000) -> None:
    """Wait until an element (looked up through shadow roots) contains `text`."""
    page.locator(selector).filter(has_text=text).first.wait_for(timeout=timeout)


def shot(page: Page, name: str) -> Path:
    """Save a full-page screenshot under test-artifacts/dashboard/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def key_for(store: Store, role: Role) -> str:
    """A fresh API key with `role`."""
    return create_key(store, name=f"dashboard-{role.value}", role=role)[0]


def add_task(store: Store, *, command: str = "echo hi", **common: Any) -> Task:
    """Create a shell task (common fields checked as the API checks them)."""
    fields = msgspec.convert({"executor": "shell"} | common, TaskFields)
    return store.insert_task(task_values(fields, {"command": command}))


def sql(database_url: str, statement: str, params: tuple[Any, ...] = ()) -> None:
    """Run one statement against the test database."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(statement, params)  # type: ignore[arg-type]
