"""The REST client shared by the CLI and the %schedule magic."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from service.config import Settings

TERMINAL = {"succeeded", "failed", "timed_out", "cancelled", "missed"}


class ClientError(Exception):
    """A failed call, with a one-line message fit to show a person."""

    def __init__(self, message: str, *, status: int | None = None, field: str | None = None):
        super().__init__(message)
        self.status, self.field = status, field


def resolve_key(settings: Settings) -> str | None:
    """NBCRON_API_KEY, else the admin key `nbcron up` wrote into the data dir."""
    if settings.api_key:
        return settings.api_key
    path = settings.admin_key_path
    return path.read_text().strip() if path.is_file() else None


class Client:
    """Thin, typed wrapper over the nbcron REST API."""

    def __init__(self, settings: Settings, *, timeout: float = 30.0) -> None:
        key = resolve_key(settings)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.base = settings.api_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClientError(
                f"cannot reach the nbcron API at {self.base} ({type(exc).__name__});"
                " start it with `make run` or `nbcron up`, or set NBCRON_API_URL"
            ) from exc
        if resp.status_code >= 400:
            raise _error(resp)
        return resp.json() if resp.content else None

    def tasks(self, **params: Any) -> list[dict[str, Any]]:
        return self.request("GET", "/api/tasks", params=_clean(params))["items"]

    def task(self, ref: str) -> dict[str, Any]:
        return self.request("GET", f"/api/tasks/{ref}")

    def create_task(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/api/tasks", json=body)

    def update_task(self, ref: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", f"/api/tasks/{ref}", json=body)

    def delete_task(self, ref: str) -> None:
        self.request("DELETE", f"/api/tasks/{ref}")

    def trigger(self, ref: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.request(
            "POST", f"/api/tasks/{ref}/trigger", json={"parameters": parameters or {}}
        )

    def runs(self, **params: Any) -> list[dict[str, Any]]:
        return self.request("GET", "/api/runs", params=_clean(params))["items"]

    def run(self, run_id: int) -> dict[str, Any]:
        return self.request("GET", f"/api/runs/{run_id}")

    def cancel(self, run_id: int) -> dict[str, Any]:
        return self.request("POST", f"/api/runs/{run_id}/cancel")

    def logs(self, run_id: int, offset: int = 0) -> dict[str, Any]:
        return self.request("GET", f"/api/runs/{run_id}/logs", params={"offset": offset})

    def follow_logs(self, run_id: int, *, offset: int = 0, reconnects: int = 5) -> Iterator[str]:
        """Yield log text as the API streams it (server-sent events) until the run ends.

        A dropped stream is resumed from the last offset, up to `reconnects` times in a row.
        """
        failures = 0
        while True:
            try:
                for event, data in self._events(
                    f"/api/runs/{run_id}/logs", {"follow": "true", "offset": offset}
                ):
                    payload = json.loads(data)
                    offset = int(payload.get("next_offset", offset))
                    if event == "end":
                        return
                    if event == "log" and payload.get("text"):
                        failures = 0
                        yield payload["text"]
            except httpx.TransportError as exc:
                if failures >= reconnects:
                    raise ClientError(f"the log stream of run {run_id} broke: {exc}") from exc
            failures += 1  # the stream ended without `end`: the API went away, resume
            if failures > reconnects:
                raise ClientError(f"the log stream of run {run_id} keeps ending early")
            time.sleep(min(0.5 * failures, 3.0))

    def _events(self, path: str, params: dict[str, Any]) -> Iterator[tuple[str, str]]:
        """(event, data) pairs of a `text/event-stream` response."""
        timeout = httpx.Timeout(30.0, read=60.0)  # the server sends a keep-alive every 15 s
        headers = {"Accept": "text/event-stream"}
        try:
            with self.http.stream(
                "GET", path, params=params, headers=headers, timeout=timeout
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise _error(resp)
                yield from parse_sse(resp.iter_lines())
        except httpx.ConnectError as exc:
            raise ClientError(
                f"cannot reach the nbcron API at {self.base} ({type(exc).__name__});"
                " start it with `make run` or `nbcron up`, or set NBCRON_API_URL"
            ) from exc

    def wait(
        self, run_id: int, *, timeout: float | None = None, poll: float = 0.25
    ) -> dict[str, Any]:
        """Poll a run until it reaches a terminal state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = self.run(run_id)
            if run["status"] in TERMINAL:
                return run
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(f"run {run_id} is still {run['status']} after {timeout}s")
            time.sleep(poll)

    def create_key(self, name: str, role: str) -> dict[str, Any]:
        return self.request("POST", "/api/keys", json={"name": name, "role": role})

    # -- helpers shared by `nbcron tasks trigger --wait` and the %schedule magic --------------

    def task_runs(self, ref: str, *, limit: int = 20) -> list[dict[str, Any]]:
        """A task's runs, newest first."""
        return self.request("GET", f"/api/tasks/{ref}/runs", params={"limit": limit})["items"]

    def find_task(self, name: str) -> dict[str, Any] | None:
        """The task called `name`, or None when there is none."""
        try:
            return self.task(name)
        except ClientError as exc:
            if exc.status == 404:
                return None
            raise

    def artifacts(self, run_id: int) -> list[dict[str, Any]]:
        """A run's artifacts (name, content type, size), without their bytes."""
        return list(self.request("GET", f"/api/runs/{run_id}/artifacts"))

    def report_url(self, task_id: int) -> str:
        """The stable link to a task's latest successful HTML report."""
        return f"{self.base}/api/tasks/{task_id}/report"

    def run_report_url(self, run_id: int) -> str:
        """The HTML report of one run."""
        return f"{self.base}/api/runs/{run_id}/artifacts/report.html"

    def watch(
        self,
        run_id: int,
        on_progress: Callable[[Progress], None],
        *,
        poll: float = 0.5,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Follow a run until it ends, reporting its progress at each poll; return the final run."""
        progress = Progress(run_id=run_id)
        offset, started = 0, time.monotonic()
        while True:
            page = self.logs(run_id, offset)
            offset = page["next_offset"]
            progress.update(page["status"], page["text"], time.monotonic() - started)
            on_progress(progress)
            if page["finished"]:
                return self.run(run_id)
            if timeout is not None and progress.elapsed > timeout:
                raise ClientError(f"run {run_id} is still {page['status']} after {timeout}s")
            time.sleep(poll)


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Server-sent events from text lines: (event name, data joined by newlines)."""
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue  # a comment (keep-alive)
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    if data:
        yield event, "\n".join(data)


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _error(resp: httpx.Response) -> ClientError:
    try:
        body = resp.json()
    except ValueError:
        body = {}
    detail = body.get("detail") or resp.text or resp.reason_phrase
    field = body.get("field")
    prefix = f"{field}: " if field and field not in str(detail) else ""
    return ClientError(f"{resp.status_code} {prefix}{detail}", status=resp.status_code, field=field)


_CELL_RE = re.compile(r"\[nbcron\] cell \d+ \((\d+)/(\d+)\) started")


@dataclass
class Progress:
    """What is known of a run while it goes: status, notebook cell, last log line, time."""

    run_id: int
    status: str = "queued"
    cell: tuple[int, int] | None = None  # notebook runs: (code cell started, code cells in all)
    last_line: str = ""
    elapsed: float = 0.0

    def update(self, status: str, text: str, elapsed: float) -> None:
        """Fold in a poll's status and new log text."""
        self.status, self.elapsed = status, elapsed
        for match in _CELL_RE.finditer(text):
            self.cell = (int(match.group(1)), int(match.group(2)))
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if lines:
            self.last_line = lines[-1][:120]

    def describe(self) -> str:
        """`run 7 running · cell 2/5 · 3.1s`."""
        parts = [f"run {self.run_id} {self.status}"]
        if self.cell:
            parts.append(f"cell {self.cell[0]}/{self.cell[1]}")
        parts.append(f"{self.elapsed:.1f}s")
        return " · ".join(parts)


def parse_param(pair: str) -> tuple[str, Any]:
    """`k=v` as (k, v): v read as JSON when it is JSON (`3`, `true`, `[1]`), else as text."""
    key, sep, value = pair.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"parameter {pair!r} is not k=v")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def exit_status(run: dict[str, Any]) -> int:
    """A finished run as a process exit status: 0 succeeded, the command's own code when it
    failed with one, 124 timed out (as timeout(1)), 1 otherwise."""
    if run["status"] == "succeeded":
        return 0
    if run["status"] == "timed_out":
        return 124
    code = run.get("exit_code")
    if run["status"] == "failed" and isinstance(code, int) and 0 < code < 256:
        return code
    return 1
