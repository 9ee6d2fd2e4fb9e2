"""Notification rules, messages and the retry policy, without servers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from service.config import Settings
from service.errors import ValidationError
from service.models import TaskFields, convert_or_422, validate_common
from service.notify import (
    MAX_TEXT_CHARS,
    DeliveryError,
    Event,
    Message,
    Notifier,
    compose,
    decide,
    log_tail,
    redact_url,
    retry_delay,
    send_email,
)

SETTINGS = Settings(
    public_url="https://nbcron.example.org/",
    notify_retry_seconds=10.0,
    notify_max_attempts=3,
    notify_log_lines=3,
)


def ctx(status: str = "failed", **extra: Any) -> dict[str, Any]:
    base = {
        "id": 41,
        "task_id": 7,
        "task_name": "nightly",
        "status": status,
        "attempt": 1,
        "exit_code": 3,
        "error": "exit status 3: boom",
        "finished_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "retried": False,
        "previous_status": None,
        "streak": 1,
        "log": "a\nb\nc\nd\n",
        "notify": {"on": ["failure"], "webhook": "https://hooks.example.org/x"},
    }
    return base | extra


@pytest.mark.parametrize(
    ("rule", "run", "expected"),
    [
        ({"on": ["failure"]}, ctx(), Event.FAILURE),
        ({"on": ["failure"]}, ctx(status="timed_out"), Event.FAILURE),
        ({"on": ["failure"]}, ctx(retried=True), None),  # a retry follows: not final yet
        ({"on": ["success"]}, ctx(), None),
        ({"on": ["success"]}, ctx(status="succeeded"), Event.SUCCESS),
        ({"on": ["failure"]}, ctx(status="succeeded"), None),
        ({"on": ["recovery"]}, ctx(status="succeeded", previous_status="failed"), Event.RECOVERY),
        ({"on": ["recovery"]}, ctx(status="succeeded", previous_status="succeeded"), None),
        (
            {"on": ["success", "recovery"]},
            ctx(status="succeeded", previous_status="timed_out"),
            Event.RECOVERY,
        ),
        ({"after_failures": 3}, ctx(streak=2), None),
        ({"after_failures": 3}, ctx(streak=3), Event.FAILURES),
        ({"after_failures": 3}, ctx(streak=4), None),  # once per streak
        ({"on": ["failure"], "after_failures": 3}, ctx(streak=3), Event.FAILURES),
        ({"on": ["failure"], "after_failures": 3}, ctx(streak=4), Event.FAILURE),
        ({"on": ["failure"]}, ctx(status="cancelled"), None),
    ],
)
def test_decide(rule: dict[str, Any], run: dict[str, Any], expected: Event | None) -> None:
    assert decide(run | {"notify": rule}) == expected


def test_message_has_the_link_the_error_and_the_last_log_lines() -> None:
    message = compose(ctx(), Event.FAILURE, SETTINGS)
    link = "https://nbcron.example.org/api/runs/41"
    assert message.subject == "nbcron: task nightly failed"
    assert message.text.splitlines()[:3] == [
        "nbcron: task nightly failed (run 41, attempt 1)",
        link,
        "error: exit status 3: boom",
    ]
    assert "```\nb\nc\nd\n```" in message.text and "a\n" not in message.text
    payload = message.payload
    assert payload["text"] == message.text and payload["link"] == link
    assert (payload["run_id"], payload["task"], payload["event"]) == (41, "nightly", "failure")
    assert payload["finished_at"] == "2026-01-02T03:04:05+00:00"


def test_message_titles_per_event_and_a_bounded_text() -> None:
    assert compose(ctx(streak=3), Event.FAILURES, SETTINGS).subject.endswith("3 times in a row")
    assert compose(ctx(status="succeeded"), Event.RECOVERY, SETTINGS).subject.endswith("recovered")
    assert compose(ctx(status="timed_out"), Event.FAILURE, SETTINGS).subject.endswith("timed out")
    huge = compose(ctx(error="x" * 10_000, log="y" * 10_000), Event.FAILURE, SETTINGS)
    assert len(huge.text) <= MAX_TEXT_CHARS
    default_link = compose(ctx(), Event.FAILURE, Settings()).payload["link"]
    assert default_link == "http://127.0.0.1:8080/api/runs/41"


def test_log_tail_and_backoff_and_redaction() -> None:
    assert log_tail("1\n2\n3\n", 2) == "2\n3"
    assert log_tail("", 5) == "" and log_tail("x\n", 0) == ""
    assert len(log_tail("z" * 5000, 1)) <= MAX_TEXT_CHARS // 2 + 1
    assert [retry_delay(SETTINGS, n) for n in (1, 2, 3)] == [10.0, 20.0, 40.0]
    assert retry_delay(SETTINGS, 30) == 3600.0
    assert (
        redact_url("https://hooks.slack.com/services/T0/B0/secret") == "https://hooks.slack.com/…"
    )
    assert redact_url("http://127.0.0.1:9000/x?token=1") == "http://127.0.0.1:9000/…"


def test_email_without_an_smtp_host_fails_for_good() -> None:
    message = Message(event=Event.FAILURE, subject="s", text="t", payload={})
    with pytest.raises(DeliveryError) as info:
        send_email(Settings(), ["a@example.org"], message)
    assert info.value.permanent


class FakeStore:
    def __init__(self, context: dict[str, Any] | None) -> None:
        self.context = context
        self.finished: list[tuple[int, str, str | None, str | None]] = []
        self.retried: list[tuple[int, float, str]] = []

    def notification_context(self, run_id: int) -> dict[str, Any] | None:
        return self.context

    def finish_notification(
        self, note_id: int, *, channel: str, status: str, event: str | None, error: str | None
    ) -> None:
        self.finished.append((note_id, status, event, error))

    def retry_notification(
        self, note_id: int, *, delay: float, event: str | None, error: str
    ) -> None:
        self.retried.append((note_id, delay, error))


def notifier(store: FakeStore, error: Exception | None = None) -> tuple[Notifier, list[Any]]:
    sent: list[Any] = []

    def sender(channel: str, rule: dict[str, Any], message: Message) -> None:
        if error is not None:
            raise error
        sent.append((channel, message.event))

    return Notifier(store, SETTINGS, sender=sender), sent  # type: ignore[arg-type]


ROW = {"id": 5, "run_id": 41, "channel": "webhook", "attempts": 1}


def test_a_delivery_is_recorded_as_sent() -> None:
    store = FakeStore(ctx())
    note, sent = notifier(store)
    note.deliver(ROW)
    assert sent == [("webhook", Event.FAILURE)]
    assert store.finished == [(5, "sent", "failure", None)]


def test_a_run_the_rule_ignores_is_skipped_without_sending() -> None:
    store = FakeStore(ctx(status="succeeded"))
    note, sent = notifier(store)
    note.deliver(ROW)
    assert sent == [] and store.finished == [(5, "skipped", None, None)]


def test_a_failing_channel_is_retried_with_backoff_then_given_up() -> None:
    store = FakeStore(ctx())
    note, _ = notifier(store, error=DeliveryError("HTTP 500"))
    note.deliver(ROW | {"attempts": 2})
    assert store.retried == [(5, 20.0, "HTTP 500")] and store.finished == []
    note.deliver(ROW | {"attempts": 3})
    assert store.finished == [(5, "failed", "failure", "HTTP 500")]


def test_any_exception_from_a_channel_is_contained_and_permanent_ones_stop_at_once() -> None:
    store = FakeStore(ctx())
    note, _ = notifier(store, error=RuntimeError("surprise"))
    note.deliver(ROW)
    assert store.retried and store.retried[0][2] == "surprise"
    store = FakeStore(ctx())
    note, _ = notifier(store, error=DeliveryError("no smtp", permanent=True))
    note.deliver(ROW)
    assert store.finished == [(5, "failed", "failure", "no smtp")] and store.retried == []


def _fields(notify: Any) -> TaskFields:
    body = {"name": "t", "executor": "shell", "notify": notify}
    fields: TaskFields = convert_or_422(body, TaskFields)
    validate_common(fields)
    return fields


def test_the_notify_field_is_validated() -> None:
    rule = {"on": ["failure", "recovery"], "after_failures": 3, "email": ["ops@example.org"]}
    assert _fields(rule).notify.after_failures == 3
    assert _fields({}).notify.on == []
    for bad in (
        {"on": ["failure"]},  # nowhere to send
        {"on": ["sometimes"], "webhook": "https://x.example.org"},
        {"webhook": "ftp://x.example.org"},
        {"email": ["not an address"]},
        {"after_failures": 0, "webhook": "https://x.example.org"},
        {"unknown": 1},
    ):
        with pytest.raises(ValidationError) as info:
            _fields(bad)
        assert info.value.extra.get("field", "").startswith("notify"), bad
