"""The REST client shared by the CLI and the %schedule magic."""

from __future__ import annotations

import time
from collections.abc import Iterator
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

    def follow_logs(self, run_id: int, *, poll: float = 0.5) -> Iterator[str]:
        """Yield log text as it arrives until the run ends."""
        offset = 0
        while True:
            page = self.logs(run_id, offset)
            if page["text"]:
                yield page["text"]
            offset = page["next_offset"]
            if page["finished"]:
                tail = self.logs(run_id, offset)
                if tail["text"]:
                    yield tail["text"]
                return
            time.sleep(poll)

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
