"""Structured logs for every nbcron process (structlog over the standard library).

One line of JSON per event when stderr is not a terminal (files, journald, containers), a
readable console line when it is. Standard-library loggers (`logging.getLogger("nbcron.x")`,
uvicorn, dramatiq) go through the same renderer, so every line carries the same keys: `event`,
`level`, `logger`, `timestamp`, `role`, and `run_id` / `task_id` / `worker` while a run executes.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog
from structlog.contextvars import bound_contextvars
from structlog.typing import Processor

from service.config import Settings

FORMATS = ("auto", "json", "console")
_role: dict[str, str] = {}


def _add_role(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Every line names the process role (api, worker, dispatcher…)."""
    if _role:
        event.setdefault("role", _role["role"])
    return event


def use_json(log_format: str, stream: TextIO) -> bool:
    """JSON unless asked for console, or `auto` and the stream is a terminal."""
    if log_format not in FORMATS:
        raise ValueError(f"setting log_format: {log_format!r} is not one of {', '.join(FORMATS)}")
    if log_format == "auto":
        return not (hasattr(stream, "isatty") and stream.isatty())
    return log_format == "json"


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _add_role,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _renderer(as_json: bool, stream: TextIO) -> Processor:
    if as_json:
        return structlog.processors.JSONRenderer()
    return structlog.dev.ConsoleRenderer(colors=bool(getattr(stream, "isatty", bool)()))


def configure_logging(settings: Settings, *, role: str, stream: TextIO | None = None) -> None:
    """Route structlog and the standard library through one renderer on stderr."""
    out = stream or sys.stderr
    as_json = use_json(settings.log_format, out)
    _role["role"] = role
    shared = _shared_processors()
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if as_json else _passthrough,
            _renderer(as_json, out),
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # httpx logs every request at INFO, full URL included (webhook URLs may hold secrets)
    logging.getLogger("httpx").setLevel(max(root.level, logging.WARNING))
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def _passthrough(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return event


@contextmanager
def run_context(*, run_id: int, task_id: int | None, worker: str) -> Iterator[None]:
    """Bind run_id, task_id and worker to every log line of this thread while a run executes."""
    with bound_contextvars(run_id=run_id, task_id=task_id, worker=worker):
        yield


def get_logger(name: str) -> Any:
    """A structlog logger named like the standard-library ones (`nbcron.notify`)."""
    return structlog.get_logger(name)
