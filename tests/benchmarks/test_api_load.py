"""The API under an open-loop load of 500 requests/s, next to a bare Litestar route.

Knobs: NBCRON_BENCH_RATE, NBCRON_BENCH_LOAD_SECONDS, NBCRON_BENCH_API_WORKERS (processes of
`nbcron api`, and of the bare app beside it). The answered rate shows when the stack fell behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from tests.benchmarks.bench_support import median, percentile, running_stack
from tests.benchmarks.conftest import Recorder
from tests.benchmarks.loadgen import Request, run_open_loop
from tests.support import ROOT, Stack, free_port

pytestmark = pytest.mark.bench
RATE = float(os.environ.get("NBCRON_BENCH_RATE", "500"))
SECONDS = float(os.environ.get("NBCRON_BENCH_LOAD_SECONDS", "30"))
API_WORKERS = int(os.environ.get("NBCRON_BENCH_API_WORKERS", "1"))  # `nbcron api` processes


@pytest.fixture
def load_stack(settings: Settings, admin_key: str, tmp_path: Path) -> Iterator[Stack]:
    served = settings.with_overrides(api_workers=API_WORKERS)
    with running_stack(served, admin_key, tmp_path, workers=1) as stack:
        yield stack


@pytest.fixture
def bare_port() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.benchmarks.bare_app", str(port), str(API_WORKERS)], cwd=ROOT
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "bare app did not start"
            time.sleep(0.1)
    yield port
    proc.terminate()
    proc.wait(10)


def test_api_under_open_loop_load(load_stack: Stack, bare_port: int, record: Recorder) -> None:
    api = load_stack.client()
    task = api.post(
        "/api/tasks", json={"name": "loaded", "executor": "shell", "command": "true"}
    ).json()
    for _ in range(60):  # some history for the runs list
        api.post("/api/tasks/loaded/trigger")
    headers = {"Authorization": f"Bearer {load_stack.key}"}
    requests = [
        Request("GET /api/tasks/{id}", "GET", f"/api/tasks/{task['id']}"),
        Request("GET /api/runs?limit=50", "GET", "/api/runs?limit=50"),
        Request(
            "POST /api/tasks/{id}/trigger",
            "POST",
            f"/api/tasks/{task['id']}/trigger",
            b'{"parameters": {}}',
        ),
    ]
    port = load_stack.settings.api_port
    nbcron = run_open_loop(port, requests, rate=RATE, seconds=SECONDS, headers=headers)
    bare = run_open_loop(
        bare_port, [Request("GET / (bare Litestar)", "GET", "/")], rate=RATE, seconds=SECONDS
    )
    base = bare.latencies["GET / (bare Litestar)"]
    assert not bare.errors and not nbcron.errors, (bare.errors, nbcron.errors)
    record.add(
        f"answered req/s @ {RATE:.0f} req/s offered ({API_WORKERS} API process(es))",
        nbcron.throughput,
        "req/s",
        baseline_name="bare Litestar",
        baseline=bare.throughput,
    )
    for label, values in nbcron.latencies.items():
        target = "<= 50 ms" if "trigger" in label else "<= 25 ms"
        record.add(
            f"{label} p50 @ {RATE:.0f} req/s",
            median(values),
            "ms",
            baseline_name="bare Litestar p50",
            baseline=median(base),
        )
        record.add(
            f"{label} p99 @ {RATE:.0f} req/s",
            percentile(values, 99),
            "ms",
            baseline_name="bare Litestar p99",
            baseline=percentile(base, 99),
            target=target,
        )
