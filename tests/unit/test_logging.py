"""Structured logs, the tracing no-op and the SSE parser, without servers."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator

import pytest
import structlog

from service import tracing
from service.client import parse_sse
from service.config import Settings
from service.logging import configure_logging, run_context, use_json
from service.store import Store


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def test_format_follows_the_terminal_unless_forced() -> None:
    assert use_json("auto", io.StringIO()) is True
    assert use_json("auto", Terminal()) is False
    assert use_json("json", Terminal()) is True
    assert use_json("console", io.StringIO()) is False
    with pytest.raises(ValueError, match="log_format"):
        use_json("yaml", io.StringIO())


def test_json_lines_carry_the_role_and_the_bound_run() -> None:
    out = io.StringIO()
    configure_logging(Settings(), role="worker", stream=out)
    log = logging.getLogger("nbcron.worker")
    log.info("before")
    with run_context(run_id=12, task_id=3, worker="w-1"):
        log.warning("inside %s", "run", extra={"attempt": 2})
        structlog.get_logger("nbcron.x").info("structured", rows=5)
    log.info("after")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["before", "inside run", "structured", "after"]
    assert all(line["role"] == "worker" and "timestamp" in line for line in lines)
    inside, structured = lines[1], lines[2]
    assert (inside["run_id"], inside["task_id"], inside["worker"]) == (12, 3, "w-1")
    assert inside["level"] == "warning" and inside["attempt"] == 2
    assert structured["run_id"] == 12 and structured["rows"] == 5
    assert "run_id" not in lines[0] and "run_id" not in lines[3]


def test_a_terminal_gets_readable_lines() -> None:
    out = Terminal()
    configure_logging(Settings(), role="api", stream=out)
    with run_context(run_id=7, task_id=1, worker="w"):
        logging.getLogger("nbcron.api").info("hello")
    line = re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue()).strip()  # colours on a terminal
    assert not line.startswith("{")
    assert "hello" in line and "run_id=7" in line


def test_tracing_is_a_no_op_when_off() -> None:
    assert tracing.setup_tracing(Settings(), role="api") is False
    assert tracing.enabled() is False
    assert tracing.store_class() is Store
    assert tracing.current_traceparent() is None
    with tracing.span("anything", x=1) as current:
        assert current is None
    tracing.annotate(a=1)


def test_tracing_without_the_packages_says_so_and_stays_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in list(sys.modules):
        if name.startswith("opentelemetry"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with caplog.at_level(logging.WARNING, logger="nbcron.tracing"):
        assert tracing.setup_tracing(Settings(tracing_enabled=True), role="worker") is False
    assert tracing.enabled() is False
    assert "OpenTelemetry is not installed" in caplog.text and "nbcron[tracing]" in caplog.text


def test_sse_parser_joins_data_lines_and_skips_comments() -> None:
    lines = [
        ": keep-alive",
        "",
        "id: 3",
        "event: log",
        'data: {"text": "a"}',
        "",
        "data: one",
        "data:two",
        "retry: 2000",
        "",
        "event: end",
        "data: {}",
    ]
    assert list(parse_sse(lines)) == [
        ("log", '{"text": "a"}'),
        ("message", "one\ntwo"),
        ("end", "{}"),
    ]
