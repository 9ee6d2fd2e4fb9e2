"""Observability end to end: /metrics, health, stats, live logs over SSE, the CLI's `logs -f`,
structured logs and OpenTelemetry traces, against real API, dispatcher and worker processes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.client import parse_sse
from service.config import Settings
from service.health import system_health
from service.store import Store
from tests.support import ROOT, Stack, free_port, wait_for, wait_run

TIMED = 'echo "one $(date +%s.%N)"; sleep 2; echo "two $(date +%s.%N)"'


def scrape(
    api: httpx.Client, path: str = "/metrics"
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, keyed by (name, sorted labels)."""
    resp = api.get(path)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def run_task(api: httpx.Client, name: str, command: str, **extra: Any) -> dict[str, Any]:
    created = api.post(
        "/api/tasks", json={"name": name, "executor": "shell", "command": command, **extra}
    )
    assert created.status_code == 201, created.text
    return wait_run(api, api.post(f"/api/tasks/{name}/trigger").json()["id"])


def test_metrics_include_workers_numbers_and_move_after_runs(stack: Stack) -> None:
    with stack.client() as api:
        wait_for(lambda: value(scrape(api), "nbcron_workers_alive") >= 1, what="a live worker")
        before = scrape(api)
        assert value(before, "nbcron_database_up") == 1
        assert value(before, "nbcron_runs_created_total", executor="shell", trigger="manual") == 0

        ok = run_task(api, "ok", "echo fine")
        again = wait_run(api, api.post("/api/tasks/ok/trigger").json()["id"])
        bad = run_task(api, "bad", "exit 3")
        assert (ok["status"], again["status"], bad["status"]) == (
            "succeeded",
            "succeeded",
            "failed",
        )
        api.post(
            "/api/tasks",
            json={"name": "stuck", "executor": "shell", "command": "true", "queue": "nowhere"},
        )
        api.post("/api/tasks/stuck/trigger")

        after = wait_for(
            lambda: (
                (s := scrape(api))
                and value(s, "nbcron_runs_finished_total", executor="shell", status="failed") == 1
                and s
            ),
            what="metrics after the runs",
        )
        assert value(after, "nbcron_runs_created_total", executor="shell", trigger="manual") == 4
        assert value(after, "nbcron_runs_finished_total", executor="shell", status="succeeded") == 2
        count = value(
            after, "nbcron_run_duration_seconds_count", executor="shell", status="succeeded"
        )
        inf = value(
            after,
            "nbcron_run_duration_seconds_bucket",
            executor="shell",
            status="succeeded",
            le="+Inf",
        )
        assert count == inf == 2
        assert (
            value(after, "nbcron_run_duration_seconds_sum", executor="shell", status="succeeded")
            > 0
        )
        assert value(after, "nbcron_dispatch_lag_seconds_count", executor="shell") == 3
        assert value(after, "nbcron_dispatch_lag_seconds_bucket", executor="shell", le="5.0") == 3
        assert value(after, "nbcron_queue_depth", queue="nowhere") == 1
        assert value(after, "nbcron_workers_alive") >= 1
        assert value(after, "nbcron_worker_threads") >= 1
        assert value(after, "nbcron_dispatchers_alive") >= 1
        assert ("nbcron_kernel_pool_size", ()) in after
        route = "/api/tasks/{ref}/trigger"
        triggered = value(
            after, "nbcron_api_requests_total", method="POST", route=route, status="202"
        )
        assert (
            triggered
            - value(before, "nbcron_api_requests_total", method="POST", route=route, status="202")
            == 4
        )
        assert (
            value(
                after,
                "nbcron_api_request_duration_seconds_count",
                method="POST",
                route=route,
                status="202",
            )
            >= 4
        )
        mirror = scrape(api, "/api/system/metrics")
        assert value(mirror, "nbcron_runs_finished_total", executor="shell", status="failed") == 1


def test_metrics_need_a_key(api_stack: Stack) -> None:
    with api_stack.client(key="") as anon:
        assert anon.get("/metrics").status_code == 401
        assert anon.get("/api/system/metrics").status_code == 401


def test_health_is_200_when_every_part_is_up(stack: Stack) -> None:
    with stack.client() as api:
        resp = wait_for(
            lambda: (r := api.get("/api/system/health")).status_code == 200 and r,
            what="a healthy stack",
        )
    body = resp.json()
    assert body["status"] == "ok" and body["failing"] == []
    assert set(body["checks"]) == {"postgres", "broker", "dispatcher", "workers"}
    for check in body["checks"].values():
        assert check["status"] == "ok"
        assert isinstance(check["latency_ms"], float | int)
    assert body["checks"]["workers"]["alive"] >= 1


def test_health_is_503_naming_a_broker_it_cannot_reach(
    settings: Settings, admin_key: str, tmp_path: Path
) -> None:
    closed = free_port()
    broken = Stack(settings=settings, key=admin_key, logs=tmp_path)
    broken.start("api", NBCRON_BROKER_URL=f"redis://127.0.0.1:{closed}/0")
    broken.start("dispatcher")
    broken.start("worker")
    try:
        broken.wait_healthy()
        with broken.client() as api:

            def only_broker_failing() -> Any:
                resp = api.get("/api/system/health")
                return resp.status_code == 503 and resp.json()["failing"] == ["broker"] and resp

            resp = wait_for(only_broker_failing, what="503 naming the broker")
        checks = resp.json()["checks"]
        assert checks["broker"]["status"] == "down" and checks["broker"]["detail"]
        assert checks["postgres"]["status"] == "ok"
        assert resp.json()["status"] == "degraded"
    finally:
        broken.stop_all()


def test_health_names_postgres_when_it_is_down(settings: Settings) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nope?connect_timeout=1"
    store = Store(url, min_size=0, max_size=1).open(wait=False)
    try:
        started = time.monotonic()
        body = system_health(store, settings)
    finally:
        store.close()
    assert time.monotonic() - started < 6
    assert body["failing"] == ["postgres"]
    assert body["checks"]["postgres"]["status"] == "down"
    assert body["checks"]["broker"]["status"] == "ok"
    assert body["checks"]["workers"]["status"] == "unknown"


def test_stats_count_tasks_runs_workers_and_queue(stack: Stack) -> None:
    with stack.client() as api:
        run_task(api, "a", "true")
        run_task(api, "b", "false")
        api.post(
            "/api/tasks",
            json={"name": "c", "executor": "shell", "command": "true", "queue": "nowhere"},
        )
        api.post("/api/tasks/c/trigger")
        stats = api.get("/api/system/stats").json()
    assert stats["tasks"] == {"total": 3, "enabled": 3, "scheduled": 0}
    assert stats["runs"]["last_hour"] == {"succeeded": 1, "failed": 1, "queued": 1}
    assert stats["runs"]["last_day"] == stats["runs"]["last_hour"]
    assert stats["workers"]["alive"] >= 1
    assert stats["queue_depth"] == 1 and stats["queues"]["nowhere"] == {"queued": 1, "due": 1}


def _events(resp: httpx.Response) -> Iterator[tuple[float, str, dict[str, Any]]]:
    for event, data in parse_sse(resp.iter_lines()):
        yield time.time(), event, json.loads(data)


def test_follow_streams_output_within_a_second_and_ends_with_the_run(stack: Stack) -> None:
    with stack.client() as api:
        api.post("/api/tasks", json={"name": "timed", "executor": "shell", "command": TIMED})
        run_id = api.post("/api/tasks/timed/trigger").json()["id"]
        params = {"follow": "true"}
        with api.stream("GET", f"/api/runs/{run_id}/logs", params=params) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = list(_events(resp))
        closed_at = time.time()
        run = api.get(f"/api/runs/{run_id}").json()

    logs = [(at, data) for at, event, data in events if event == "log"]
    text = "".join(d["text"] for _, d in logs)
    assert [line.split()[0] for line in text.splitlines()] == ["one", "two"]
    for line in text.splitlines():
        printed = float(line.split()[1])
        received = next(at for at, d in logs if line in d["text"])
        assert received - printed < 1.0, (
            f"{line!r} arrived {received - printed:.2f}s after it was printed"
        )
    assert events[-1][1] == "end" and events[-1][2]["status"] == "succeeded"
    finished = _seconds(run["finished_at"])
    assert closed_at - finished < 1.5, "the stream did not close when the run ended"


def _seconds(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def test_follow_resumes_from_last_event_id_and_404s_unknown_runs(stack: Stack) -> None:
    with stack.client() as api:
        run = run_task(api, "done", "echo done")
        page = api.get(f"/api/runs/{run['id']}/logs").json()
        assert page["text"] == "done\n"
        headers = {"Last-Event-ID": str(page["next_offset"])}
        with api.stream("GET", f"/api/runs/{run['id']}/logs?follow=true", headers=headers) as resp:
            events = [e for _, e, _ in _events(resp)]
        assert events == ["end"]
        missing = api.get("/api/runs/999999/logs", params={"follow": "true"})
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")


def test_cli_logs_follow_streams_lines_as_they_are_printed(stack: Stack) -> None:
    with stack.client() as api:
        api.post("/api/tasks", json={"name": "timed", "executor": "shell", "command": TIMED})
        run_id = api.post("/api/tasks/timed/trigger").json()["id"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "runs", "logs", "-f", str(run_id)],
        cwd=ROOT,
        env=stack.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = [(time.time(), line) for line in iter(proc.stdout.readline, "")]
    assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    assert [line.split()[0] for _, line in lines] == ["one", "two"]
    for received, line in lines:
        assert received - float(line.split()[1]) < 1.5, f"{line!r} was not streamed"


def test_worker_logs_are_json_with_the_run_bound(stack: Stack) -> None:
    with stack.client() as api:
        run = run_task(api, "logged", "echo hi")

    def finished_line() -> dict[str, Any] | None:
        for line in stack.log_text("worker").splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("run_id") == run["id"]:
                    return record
        return None

    record = wait_for(finished_line, what="a JSON log line with run_id")
    assert record["task_id"] == run["task_id"]
    assert record["worker"] == run["worker"]
    assert record["role"] == "worker" and record["level"] == "info"
    assert record["event"] == f"run {run['id']} succeeded"


# -- tracing -------------------------------------------------------------------


class _OtlpReceiver(BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:
        self.bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def otlp() -> Iterator[tuple[str, list[bytes]]]:
    received: list[bytes] = []
    handler = type("Receiver", (_OtlpReceiver,), {"bodies": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", received
    server.shutdown()


def _spans(bodies: list[bytes]) -> list[Any]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    spans = []
    for body in list(bodies):
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                spans.extend(scope.spans)
    return spans


def _attributes(span: Any) -> dict[str, Any]:
    out = {}
    for kv in span.attributes:
        field = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, field) if field else None
    return out


def test_one_trace_from_the_request_through_dispatch_to_execution(
    settings: Settings, admin_key: str, tmp_path: Path, otlp: tuple[str, list[bytes]]
) -> None:
    endpoint, bodies = otlp
    traced = dataclasses.replace(settings, tracing_enabled=True, tracing_endpoint=endpoint)
    stack = Stack(settings=traced, key=admin_key, logs=tmp_path)
    for role in ("api", "dispatcher", "worker"):
        stack.start(role, OTEL_BSP_SCHEDULE_DELAY="100")
    try:
        stack.wait_healthy()
        with stack.client() as api:
            api.post("/api/tasks", json={"name": "traced", "executor": "shell", "command": "true"})
            run = wait_run(api, api.post("/api/tasks/traced/trigger").json()["id"])

        def trace_of_run() -> list[Any] | None:
            spans = _spans(bodies)
            names = {s.name for s in spans}
            wanted = {"POST /api/tasks/{ref}/trigger", "dispatch run", "execute run"}
            return spans if wanted <= names else None

        spans = wait_for(trace_of_run, timeout=20, what="spans from api, dispatcher and worker")
    finally:
        stack.stop_all()
    request = next(s for s in spans if s.name == "POST /api/tasks/{ref}/trigger")
    dispatch = next(s for s in spans if s.name == "dispatch run")
    execute = next(s for s in spans if s.name == "execute run")
    assert request.trace_id == dispatch.trace_id == execute.trace_id
    assert dispatch.parent_span_id == execute.parent_span_id == request.span_id
    assert _attributes(execute)["nbcron.run_id"] == run["id"]
    assert _attributes(execute)["nbcron.task_id"] == run["task_id"]
    assert _attributes(execute)["nbcron.outcome"] == "succeeded"
    assert _attributes(dispatch)["nbcron.run_id"] == run["id"]
