"""Server-sent events for GET /api/runs/{id}/logs?follow=true.

Events: `log` (data `{"text", "next_offset"}`) as output arrives, then one `end`
(data `{"status", "exit_code", "error", "next_offset"}`) when the run is over, and the stream
closes. Each event's `id` is the next chunk offset, so a client that reconnects (an EventSource
sends `Last-Event-ID`) resumes where it stopped. A comment line every 15 s keeps proxies from
closing a quiet stream.

The worker flushes output to Postgres every 0.5 s; polling every 0.2 s keeps delivery within
about 0.7 s of the process writing it. The status is read before the logs, so when the status
is final the logs read after it are complete.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from service.errors import NbcronError
from service.models import Run
from service.store import Store

log = logging.getLogger("nbcron.api")
POLL_SECONDS = 0.2
KEEPALIVE_SECONDS = 15.0
RETRY_MS = 2000


def resume_offset(offset: int, last_event_id: str | None) -> int:
    """The offset to start from: `Last-Event-ID` (a reconnect) wins over `?offset=`."""
    if last_event_id and last_event_id.strip().isdigit():
        return int(last_event_id.strip())
    return offset


def _message(event: str, offset: int, **data: Any) -> ServerSentEventMessage:
    return ServerSentEventMessage(
        event=event, id=offset, data=json.dumps({**data, "next_offset": offset}), retry=RETRY_MS
    )


def _end(run: Run, offset: int) -> ServerSentEventMessage:
    return _message(
        "end", offset, status=run.status.value, exit_code=run.exit_code, error=run.error
    )


async def _read(store: Store, run_id: int, offset: int) -> tuple[Run, list[dict[str, Any]]]:
    run = await anyio.to_thread.run_sync(store.get_run, run_id)
    chunks = await anyio.to_thread.run_sync(lambda: store.get_logs(run_id, offset=offset))
    return run, chunks


async def log_events(
    store: Store, run_id: int, *, offset: int
) -> AsyncIterator[ServerSentEventMessage]:
    """`log` events as output arrives, then `end` once the run's status is final."""
    quiet_since = time.monotonic()
    while True:
        try:
            run, chunks = await _read(store, run_id, offset)
        except NbcronError as exc:  # Postgres blinked: keep the stream, try again
            log.warning("log stream of run %s: %s", run_id, exc)
            await anyio.sleep(1.0)
            continue
        if chunks:
            offset = chunks[-1]["seq"] + 1
            yield _message("log", offset, text="".join(c["data"] for c in chunks))
            quiet_since = time.monotonic()
        if run.status.terminal:
            yield _end(run, offset)
            return
        if time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
            yield ServerSentEventMessage(data=None, comment="keep-alive")
            quiet_since = time.monotonic()
        await anyio.sleep(POLL_SECONDS)


class EventStream(ServerSentEvent):
    """Keeps `text/event-stream` from a handler that otherwise answers JSON.

    Litestar 2 lets the handler's media type win over the response's own; the logs route
    returns JSON when not following, so the stream states its type itself.
    """

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["media_type"] = self.media_type
        return super().to_asgi_response(*args, **kwargs)


def follow_response(store: Store, run_id: int, *, offset: int) -> ServerSentEvent:
    """The SSE response; the run must exist (a 404 is raised before streaming starts)."""
    store.get_run(run_id)
    return EventStream(log_events(store, run_id, offset=offset))
