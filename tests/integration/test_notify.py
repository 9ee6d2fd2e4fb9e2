"""Notifications end to end: real API, dispatcher and worker processes, a real HTTP receiver and a
real SMTP server (aiosmtpd) on loopback."""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller

from service.config import Settings
from service.store import Store
from tests.support import Stack, free_port, wait_for, wait_run, webhook_receiver

PUBLIC = "https://nbcron.example.org"


@dataclass
class Receiver:
    """A webhook endpoint: records JSON bodies; answers 500 to the first `fail_first` posts."""

    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    posts: int = 0
    fail_first: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, body: bytes) -> int:
        with self.lock:
            self.posts += 1
            if self.posts <= self.fail_first:
                return 500
            self.bodies.append(json.loads(body))
            return 200


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()
    with webhook_receiver(state.handle) as url:
        state.url = url
        yield state


class Mailbox:
    """An aiosmtpd handler that keeps every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), message_from_bytes(envelope.content)))
        return "250 OK"


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    box, port = Mailbox(), free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield box, port
    controller.stop()


@pytest.fixture
def notify_stack(
    settings: Settings, admin_key: str, tmp_path: Path, mailbox: tuple[Mailbox, int]
) -> Iterator[Stack]:
    """API, dispatcher and worker with SMTP pointed at the loopback mailbox and fast retries."""
    tuned = dataclasses.replace(
        settings,
        smtp_host="127.0.0.1",
        smtp_port=mailbox[1],
        smtp_tls="off",
        smtp_from="nbcron@example.org",
        public_url=PUBLIC,
        notify_retry_seconds=0.3,
        notify_poll_seconds=0.5,
        notify_max_attempts=3,
        notify_timeout_seconds=2.0,
    )
    stack = Stack(settings=tuned, key=admin_key, logs=tmp_path)
    for role in ("api", "dispatcher", "worker"):
        stack.start(role)
    try:
        stack.wait_healthy()
        yield stack
    finally:
        stack.stop_all()


def _task(api: httpx.Client, name: str, command: str, notify: dict[str, Any]) -> None:
    body = {"name": name, "executor": "shell", "command": command, "notify": notify}
    resp = api.post("/api/tasks", json=body)
    assert resp.status_code == 201, resp.text
    assert resp.json()["notify"]["on"] == notify.get("on", [])


def _trigger(api: httpx.Client, name: str, **params: str) -> dict[str, Any]:
    resp = api.post(f"/api/tasks/{name}/trigger", json={"parameters": params})
    return wait_run(api, resp.json()["id"])


def _settled(store: Store, run_id: int, count: int) -> list[dict[str, Any]]:
    """The run's notification rows once `count` of them are no longer pending."""

    def done() -> list[dict[str, Any]] | None:
        rows = store.notifications_of_run(run_id)
        finished = [r for r in rows if r["status"] != "pending"]
        return rows if len(finished) >= count else None

    return wait_for(done, timeout=30, what=f"notifications of run {run_id}")


def test_a_failure_reaches_the_webhook_and_the_mailbox_with_link_error_and_log(
    notify_stack: Stack, store: Store, receiver: Receiver, mailbox: tuple[Mailbox, int]
) -> None:
    rule = {"on": ["failure"], "webhook": receiver.url, "email": ["ops@example.org"]}
    command = "for i in 1 2 3 4 5; do echo step $i; done; echo boom >&2; exit 3"
    with notify_stack.client() as api:
        _task(api, "nightly", command, rule)
        run = _trigger(api, "nightly")
    assert run["status"] == "failed" and run["exit_code"] == 3
    rows = _settled(store, run["id"], 2)
    assert {(r["channel"], r["status"], r["event"]) for r in rows} == {
        ("webhook", "sent", "failure"),
        ("email", "sent", "failure"),
    }

    link = f"{PUBLIC}/api/runs/{run['id']}"
    [hook] = receiver.bodies
    assert hook["event"] == "failure" and hook["run_id"] == run["id"] and hook["task"] == "nightly"
    assert hook["link"] == link and "boom" in hook["error"]
    assert "step 5" in hook["log_tail"]
    for part in ("nightly", "failed", link, "boom", "step 5"):
        assert part in hook["text"]  # Slack shows `text`

    box, _ = mailbox
    [(to, mail)] = box.messages
    assert to == ["ops@example.org"]
    assert mail["From"] == "nbcron@example.org" and "nightly" in mail["Subject"]
    body = mail.get_payload(decode=True).decode()
    for part in (link, "boom", "step 5"):
        assert part in body


def test_success_recovery_and_n_consecutive_failures(
    notify_stack: Stack, store: Store, receiver: Receiver
) -> None:
    rule = {"on": ["success", "recovery"], "after_failures": 2, "webhook": receiver.url}
    with notify_stack.client() as api:
        _task(api, "flaky", 'test "$NBCRON_PARAM_OK" = yes', rule)
        runs = [_trigger(api, "flaky", OK=ok) for ok in ("no", "no", "no", "yes", "yes")]
    assert [r["status"] for r in runs] == ["failed"] * 3 + ["succeeded"] * 2
    for run in runs:
        _settled(store, run["id"], len(store.notifications_of_run(run["id"])))
    wait_for(lambda: len(receiver.bodies) == 3, what="three webhook posts")
    events = sorted((b["run_id"], b["event"]) for b in receiver.bodies)
    assert events == [
        (runs[1]["id"], "failures"),
        (runs[3]["id"], "recovery"),
        (runs[4]["id"], "success"),
    ]
    failures = next(b for b in receiver.bodies if b["event"] == "failures")
    assert failures["consecutive_failures"] == 2 and "2 times in a row" in failures["text"]


def test_a_failing_channel_is_retried_and_never_fails_the_run(
    notify_stack: Stack, store: Store, receiver: Receiver, mailbox: tuple[Mailbox, int]
) -> None:
    receiver.fail_first = 2
    dead = f"http://127.0.0.1:{free_port()}/nobody-listens"
    with notify_stack.client() as api:
        _task(api, "retried", "echo ok", {"on": ["success"], "webhook": receiver.url})
        _task(
            api,
            "dead-hook",
            "echo ok",
            {"on": ["success"], "webhook": dead, "email": ["a@example.org"]},
        )
        first = _trigger(api, "retried")
        second = _trigger(api, "dead-hook")
    assert first["status"] == second["status"] == "succeeded"

    [row] = _settled(store, first["id"], 1)
    assert (row["status"], row["attempts"]) == ("sent", 3)
    assert receiver.posts == 3 and len(receiver.bodies) == 1

    rows = {r["channel"]: r for r in _settled(store, second["id"], 2)}
    assert rows["email"]["status"] == "sent"
    assert rows["webhook"]["status"] == "failed" and rows["webhook"]["attempts"] == 3
    error = rows["webhook"]["last_error"]
    assert dead.rsplit("/", 1)[0] in error and "nobody-listens" not in error  # path redacted
    assert mailbox[0].messages, "the e-mail channel still delivered"
    assert store.get_run(second["id"]).status == "succeeded"
    log = notify_stack.log_text("worker")
    assert "notification failed, retrying" in log and "notification given up" in log


def test_a_run_whose_worker_died_is_still_notified(
    notify_stack: Stack, store: Store, receiver: Receiver
) -> None:
    """At least once: the reaper records 'worker lost', a new worker's notifier delivers it."""
    with notify_stack.client() as api:
        _task(api, "long", "sleep 60", {"on": ["failure"], "webhook": receiver.url})
        run_id = api.post("/api/tasks/long/trigger").json()["id"]
        wait_for(
            lambda: api.get(f"/api/runs/{run_id}").json()["status"] == "running", what="running"
        )
        notify_stack.stop("worker", sig=signal.SIGKILL)
        notify_stack.start("worker", name="worker2")
        run = wait_run(api, run_id, timeout=60)
    assert run["status"] == "failed" and run["error"] == "worker lost"
    wait_for(lambda: receiver.bodies, timeout=30, what="the failure notification")
    [hook] = receiver.bodies
    assert hook["run_id"] == run_id and hook["event"] == "failure" and "worker lost" in hook["text"]


def test_a_rule_without_a_channel_is_rejected(notify_stack: Stack) -> None:
    with notify_stack.client() as api:
        body = {"name": "x", "executor": "shell", "command": "true", "notify": {"on": ["failure"]}}
        resp = api.post("/api/tasks", json=body)
        bad_event = api.post(
            "/api/tasks",
            json={**body, "notify": {"on": ["sometimes"], "webhook": "http://127.0.0.1/"}},
        )
    assert resp.status_code == 422 and resp.json()["field"] == "notify"
    assert bad_event.status_code == 422
