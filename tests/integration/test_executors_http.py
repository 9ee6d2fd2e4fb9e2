"""HTTP executor against real HTTP servers on loopback: the executor itself, then end to end.

Server `allowed` listens on 127.0.0.2 and is the only allowlisted address; server `victim` on
127.0.0.1 stands for everything the executor must never reach. No test mocks anything.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from executors import ExecutorConfig, Outcome, Result, RunContext, get_executor
from tests.integration.executor_support import (
    LoopbackServer,
    artifact,
    log_text,
    module_stack,
    run_task,
)
from tests.support import Stack

ALLOWLIST = ("127.0.0.2",)


@pytest.fixture(scope="module")
def allowed() -> Iterator[LoopbackServer]:
    server = LoopbackServer(host="127.0.0.2").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def victim() -> Iterator[LoopbackServer]:
    server = LoopbackServer(host="127.0.0.1").start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_hits(allowed: LoopbackServer, victim: LoopbackServer) -> None:
    allowed.hits.clear()
    victim.hits.clear()


class Capture:
    """A run context that keeps the log and the artifacts."""

    def __init__(self, **config: Any) -> None:
        self.logs: list[str] = []
        self.artifacts: dict[str, tuple[str, bytes]] = {}
        self.config = ExecutorConfig(http_allowlist=config.pop("allowlist", ALLOWLIST), **config)

    def ctx(self, **extra: Any) -> RunContext:
        return RunContext(
            run_id=1,
            task_name="http-test",
            log=self.logs.append,
            add_artifact=lambda n, t, d: self.artifacts.__setitem__(n, (t, d)),
            config=self.config,
            **extra,
        )

    @property
    def text(self) -> str:
        return "".join(self.logs)

    def response(self) -> dict[str, Any]:
        content_type, data = self.artifacts["response.json"]
        assert content_type == "application/json"
        return dict(json.loads(data))


def run_http(fields: dict[str, Any], capture: Capture | None = None, **ctx: Any) -> Result:
    executor = get_executor("http")
    spec = executor.parse_spec(fields)
    capture = capture or Capture()
    return executor.run(spec, capture.ctx(**ctx))


# -- the executor on its own -------------------------------------------------------------------


def test_get_records_status_headers_and_body(allowed: LoopbackServer) -> None:
    capture = Capture()
    result = run_http({"url": allowed.base + "/ok", "expect_status": 200}, capture)
    assert result.outcome is Outcome.SUCCEEDED and result.exit_code == 200
    assert "HTTP/1.1 200 OK" in capture.text
    assert "x-probe: nbcron" in capture.text
    assert "hello from loopback" in capture.text
    record = capture.response()
    assert record["status"] == 200 and record["body"] == "hello from loopback"
    assert ["x-probe", "nbcron"] in record["headers"]
    assert allowed.paths() == ["/ok"]


def test_json_body_and_headers_are_sent(allowed: LoopbackServer) -> None:
    capture = Capture()
    fields = {
        "url": allowed.base + "/echo",
        "method": "POST",
        "json": {"day": "2024-01-01", "n": 3},
        "headers": {"X-Token": "secret-ish"},
    }
    assert run_http(fields, capture).outcome is Outcome.SUCCEEDED
    echoed = json.loads(capture.response()["body"])
    assert echoed["method"] == "POST"
    assert json.loads(echoed["body"]) == {"day": "2024-01-01", "n": 3}
    assert echoed["headers"]["x-token"] == "secret-ish"
    assert echoed["headers"]["content-type"] == "application/json"

    capture = Capture()
    fields = {"url": allowed.base + "/echo", "method": "PUT", "body": "plain text"}
    assert run_http(fields, capture).outcome is Outcome.SUCCEEDED
    assert json.loads(capture.response()["body"])["body"] == "plain text"


@pytest.mark.parametrize(
    ("code", "expect", "outcome"),
    [
        (204, 204, Outcome.SUCCEEDED),
        (404, [200, 404], Outcome.SUCCEEDED),
        (503, "5xx", Outcome.SUCCEEDED),
        (201, "200-204", Outcome.SUCCEEDED),
        (500, "2xx", Outcome.FAILED),
        (200, [201, 202], Outcome.FAILED),
        (418, 200, Outcome.FAILED),
    ],
)
def test_expect_status_accepts_a_code_a_list_or_a_range(
    allowed: LoopbackServer, code: int, expect: Any, outcome: Outcome
) -> None:
    result = run_http({"url": f"{allowed.base}/status?code={code}", "expect_status": expect})
    assert result.outcome is outcome, result
    assert result.exit_code == code
    if outcome is Outcome.FAILED:
        assert result.error is not None and f"unexpected status {code}" in result.error


def test_response_body_is_capped_with_a_marker(allowed: LoopbackServer) -> None:
    capture = Capture(http_max_response_bytes=1000)
    result = run_http({"url": allowed.base + "/big"}, capture)
    assert result.outcome is Outcome.SUCCEEDED
    assert "response body truncated at 1000 bytes" in capture.text
    record = capture.response()
    assert record["body_truncated"] is True and len(record["body"]) == 1000
    assert "END" not in capture.text


def test_redirects_are_not_followed_unless_asked(allowed: LoopbackServer) -> None:
    target = allowed.base + "/ok"
    result = run_http({"url": f"{allowed.base}/redirect?to={target}"})
    assert result.outcome is Outcome.FAILED and result.exit_code == 302
    assert result.error is not None and "not followed" in result.error
    assert allowed.paths() == [f"/redirect?to={target}"]

    capture = Capture()
    fields = {"url": f"{allowed.base}/redirect?to={target}", "follow_redirects": True}
    assert run_http(fields, capture).outcome is Outcome.SUCCEEDED
    assert allowed.paths()[-1] == "/ok"
    assert capture.response()["redirects"][0]["status"] == 302


def test_a_redirect_to_localhost_is_refused(
    allowed: LoopbackServer, victim: LoopbackServer
) -> None:
    for target in (f"http://localhost:{victim.port}/ok", f"http://127.0.0.1:{victim.port}/ok"):
        fields = {"url": f"{allowed.base}/redirect?to={target}", "follow_redirects": True}
        result = run_http(fields)
        assert result.outcome is Outcome.FAILED
        assert result.error is not None and "refused to connect to 127.0.0.1" in result.error
    assert victim.hits == []


FORBIDDEN_SPELLINGS = [
    "http://127.0.0.1:{port}/ok",
    "http://localhost:{port}/ok",
    "http://LOCALHOST.:{port}/ok",
    "http://0x7f000001:{port}/ok",
    "http://2130706433:{port}/ok",
    "http://127.1:{port}/ok",
    "http://0x7f.1:{port}/ok",
    "http://[::ffff:127.0.0.1]:{port}/ok",
    "http://[::ffff:7f00:1]:{port}/ok",
    "http://[::1]:{port}/ok",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://[::ffff:a9fe:a9fe]/latest/meta-data/",
    "http://0xa9fea9fe/latest/meta-data/",
    "http://2852039166/latest/meta-data/",
    "http://10.0.0.1/",
    "http://192.168.0.1/",
    "http://0.0.0.0:{port}/ok",
]


@pytest.mark.parametrize("spelling", FORBIDDEN_SPELLINGS)
def test_every_spelling_of_a_forbidden_address_is_refused(
    victim: LoopbackServer, spelling: str
) -> None:
    started = time.monotonic()
    result = run_http({"url": spelling.format(port=victim.port)}, timeout_seconds=5)
    assert result.outcome is Outcome.FAILED, result
    assert result.error is not None and "refused to connect to" in result.error
    assert "http_allowlist" in result.error
    assert time.monotonic() - started < 2  # refused before any connection attempt
    assert victim.hits == []


def test_the_allowlist_is_honoured_in_every_spelling(victim: LoopbackServer) -> None:
    capture = Capture(allowlist=("127.0.0.0/8",))
    result = run_http({"url": f"http://0x7f000001:{victim.port}/ok"}, capture)
    assert result.outcome is Outcome.SUCCEEDED, result
    by_name = Capture(allowlist=("localhost",))
    assert run_http({"url": f"http://localhost:{victim.port}/ok"}, by_name).outcome is (
        Outcome.SUCCEEDED
    )
    assert len(victim.hits) == 2


def test_whole_run_timeout_and_cancel_stop_a_slow_request(allowed: LoopbackServer) -> None:
    started = time.monotonic()
    result = run_http({"url": allowed.base + "/slow?seconds=10"}, timeout_seconds=1)
    assert result.outcome is Outcome.TIMED_OUT
    assert time.monotonic() - started < 3

    capture = Capture()
    ctx = capture.ctx()
    threading.Timer(0.5, ctx.cancel_event.set).start()
    executor = get_executor("http")
    started = time.monotonic()
    result = executor.run(executor.parse_spec({"url": allowed.base + "/slow?seconds=10"}), ctx)
    assert result.outcome is Outcome.CANCELLED
    assert time.monotonic() - started < 3


# -- end to end through API, dispatcher and worker ----------------------------------------------


@pytest.fixture(scope="module")
def stack(template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder: Path = tmp_path_factory.mktemp("http-stack")
    with module_stack(
        template_db, folder, http_allowlist=ALLOWLIST, http_max_response_bytes=4096
    ) as running:
        yield running


def test_http_task_end_to_end_records_the_response(stack: Stack, allowed: LoopbackServer) -> None:
    body = {
        "name": "ping",
        "executor": "http",
        "url": allowed.base + "/ok",
        "method": "GET",
        "expect_status": 200,
    }
    with stack.client() as api:
        run = run_task(api, body)
        assert run["status"] == "succeeded" and run["exit_code"] == 200, run
        text = log_text(api, run["id"])
        assert "HTTP/1.1 200 OK" in text and "x-probe: nbcron" in text
        assert "hello from loopback" in text
        listed = api.get(f"/api/runs/{run['id']}/artifacts").json()
        assert [a["name"] for a in listed] == ["response.json"]
        response = artifact(api, run["id"], "response.json")
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["status"] == 200

        big = run_task(api, {"name": "big", "executor": "http", "url": allowed.base + "/big"})
        assert big["status"] == "succeeded"
        assert "response body truncated at 4096 bytes" in log_text(api, big["id"])


def test_forbidden_addresses_fail_the_run_end_to_end(
    stack: Stack, allowed: LoopbackServer, victim: LoopbackServer
) -> None:
    urls = [
        f"http://0x7f000001:{victim.port}/ok",
        f"http://2130706433:{victim.port}/ok",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        f"{allowed.base}/redirect?to=http://localhost:{victim.port}/ok",
    ]
    with stack.client() as api:
        for i, url in enumerate(urls):
            body = {"name": f"ssrf-{i}", "executor": "http", "url": url, "follow_redirects": True}
            run = run_task(api, body)
            assert run["status"] == "failed", run
            assert "refused to connect to" in run["error"]
    assert victim.hits == []


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"url": "ftp://example.org/"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"url": "http://example.org/", "json": {"a": 1}, "body": "x"}, "body"),
        ({"url": "http://example.org/", "expect_status": "2xy"}, "expect_status"),
        ({"url": "http://example.org/", "expect_status": 999}, "expect_status"),
        ({"url": "http://example.org/", "method": "BREW"}, "method"),
        ({"url": "http://example.org/", "headers": {"bad name": "x"}}, "headers"),
        ({"url": "http://example.org/", "follow": True}, "follow"),
        ({}, "url"),
    ],
)
def test_http_fields_are_checked_at_create(
    stack: Stack, fields: dict[str, Any], field: str
) -> None:
    with stack.client() as api:
        resp = api.post("/api/tasks", json={"name": "bad-http", "executor": "http", **fields})
    assert resp.status_code == 422, resp.text
    assert resp.json()["field"] == field
