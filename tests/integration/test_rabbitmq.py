"""RabbitMQ as the broker: the same run path end to end (Redis is the default)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from service.config import Settings
from tests.support import Stack, wait_run

AMQP_URL = os.environ.get("NBCRON_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


@pytest.fixture
def rabbit_stack(settings: Settings, admin_key: str, tmp_path: Path) -> Iterator[Stack]:
    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
    except pika.exceptions.AMQPError as exc:  # never a skip: CI starts RabbitMQ
        raise AssertionError(f"RabbitMQ is not reachable at {AMQP_URL}: {exc}") from exc
    queue = f"q{tmp_path.name[-8:]}".replace("-", "_")
    local = settings.with_overrides(broker_url=AMQP_URL, worker_queues=(queue,))
    stack = Stack(settings=local, key=admin_key, logs=tmp_path)
    stack.start("api")
    stack.start("dispatcher")
    stack.start("worker")
    try:
        stack.wait_healthy()
        yield stack
    finally:
        stack.stop_all()


def test_a_run_goes_through_rabbitmq(rabbit_stack: Stack) -> None:
    queue = rabbit_stack.settings.worker_queues[0]
    with rabbit_stack.client() as api:
        body = {"name": "via-amqp", "executor": "shell", "command": "echo rabbit", "queue": queue}
        assert api.post("/api/tasks", json=body).status_code == 201
        run = wait_run(api, api.post("/api/tasks/via-amqp/trigger").json()["id"], timeout=60)
        assert run["status"] == "succeeded", run
        assert "rabbit" in api.get(f"/api/runs/{run['id']}/logs").json()["text"]
