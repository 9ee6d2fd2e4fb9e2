"""Per-task notifications: tell people when a run fails, succeeds, recovers, or keeps failing.

How delivery is guaranteed without blocking a run:
- When a run of a task with a `notify` rule reaches a final status, a trigger adds one pending
  row per channel to `notifications` in the same transaction (migrations/0002_observability.sql).
  The row exists if and only if the status was recorded, whoever recorded it (a worker, or the
  dispatcher's reaper for a lost worker).
- Every worker process runs one `Notifier` thread. The worker wakes it right after recording a
  run's status, and it also polls, so rows left by a dead process are picked up by another.
  Rows are claimed with `FOR UPDATE SKIP LOCKED` and a lease, so each is delivered once in the
  normal case and at least once when a notifier dies mid-delivery.
- A failing channel is retried with exponential backoff up to `notify_max_attempts`, each failure
  logged; it never touches the run, whose status was committed before any of this.

Events (the rule is `{"on": [...], "after_failures": N, "webhook": URL, "email": [...]}`):
- `failure`: a run failed or timed out and no retry follows it.
- `success`: a run succeeded. `recovery`: it succeeded and the task's previous final run failed.
- `failures`: the N-th final failure in a row (`after_failures`), once per streak.
A run sends at most one message per channel; `recovery` wins over `success`, `failures` over
`failure`.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import threading
from dataclasses import dataclass
from email.message import EmailMessage
from enum import StrEnum
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from service.config import Settings
from service.errors import NbcronError
from service.store import Store

log = logging.getLogger("nbcron.notify")
MAX_RETRY_SECONDS = 3600.0
MAX_TEXT_CHARS = 3500  # Slack shows about 4000 characters of a message's text
FAILED = ("failed", "timed_out")


class Event(StrEnum):
    FAILURE = "failure"  # a final failure (no retry follows)
    SUCCESS = "success"  # a run succeeded
    RECOVERY = "recovery"  # a success after a final failure
    FAILURES = "failures"  # the N-th final failure in a row (after_failures)


class DeliveryError(Exception):
    """A channel could not deliver; `permanent` when retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True, kw_only=True)
class Message:
    """One notification, rendered for every channel."""

    event: Event
    subject: str
    text: str
    payload: dict[str, Any]


def decide(ctx: dict[str, Any]) -> Event | None:
    """The event a finished run means under its task's rule, or None for no message."""
    rule = ctx.get("notify") or {}
    wanted = set(rule.get("on") or [])
    if ctx["status"] == "succeeded":
        if "recovery" in wanted and ctx.get("previous_status") in FAILED:
            return Event.RECOVERY
        return Event.SUCCESS if "success" in wanted else None
    if ctx["status"] not in FAILED or ctx.get("retried"):
        return None
    after = rule.get("after_failures")
    if after and int(ctx.get("streak") or 0) == int(after):
        return Event.FAILURES
    return Event.FAILURE if "failure" in wanted else None


def log_tail(text: str, lines: int) -> str:
    """The last `lines` lines of a run's output, at most MAX_TEXT_CHARS / 2 characters."""
    tail = "\n".join(text.rstrip("\n").splitlines()[-lines:]) if lines > 0 else ""
    limit = MAX_TEXT_CHARS // 2
    return tail if len(tail) <= limit else "…" + tail[-limit:]


def run_link(settings: Settings, run_id: int) -> str:
    base = (settings.public_url or settings.api_url).rstrip("/")
    return f"{base}/api/runs/{run_id}"


def report_link(settings: Settings, ctx: dict[str, Any]) -> str | None:
    """The run's HTML report: the task's stable report link after a success, else the run's own."""
    if not ctx.get("has_report"):
        return None
    base = (settings.public_url or settings.api_url).rstrip("/")
    if ctx["status"] == "succeeded":
        return f"{base}/api/tasks/{ctx['task_id']}/report"
    return f"{base}/api/runs/{ctx['id']}/artifacts/report.html"


def _title(ctx: dict[str, Any], event: Event) -> str:
    task, status = ctx["task_name"], str(ctx["status"]).replace("_", " ")
    if event is Event.FAILURES:
        return f"nbcron: task {task} failed {ctx['streak']} times in a row"
    if event is Event.RECOVERY:
        return f"nbcron: task {task} recovered"
    return f"nbcron: task {task} {status}"


def compose(ctx: dict[str, Any], event: Event, settings: Settings) -> Message:
    """The subject, Slack-compatible text and JSON payload for one finished run."""
    link, tail = (
        run_link(settings, ctx["id"]),
        log_tail(ctx.get("log") or "", settings.notify_log_lines),
    )
    title = _title(ctx, event)
    parts = [f"{title} (run {ctx['id']}, attempt {ctx['attempt']})", link]
    report = report_link(settings, ctx)
    if report:
        parts.append(f"report: {report}")
    if ctx.get("error"):
        parts.append(f"error: {ctx['error']}")
    if tail:
        parts.append(f"last lines of the log:\n```\n{tail}\n```")
    text = "\n".join(parts)[:MAX_TEXT_CHARS]
    payload = {
        "text": text,
        "event": event.value,
        "task": ctx["task_name"],
        "task_id": ctx["task_id"],
        "run_id": ctx["id"],
        "status": str(ctx["status"]),
        "attempt": ctx["attempt"],
        "exit_code": ctx.get("exit_code"),
        "error": ctx.get("error"),
        "link": link,
        "report": report,
        "log_tail": tail,
        "consecutive_failures": int(ctx.get("streak") or 0),
        "finished_at": ctx["finished_at"].isoformat() if ctx.get("finished_at") else None,
    }
    return Message(event=event, subject=title, text=text, payload=payload)


def redact_url(url: str) -> str:
    """The scheme, host and port only: webhook paths often hold a secret (Slack's do)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}/…"


def send_webhook(url: str, message: Message, *, timeout: float) -> None:
    """POST the JSON payload (its `text` field is what Slack shows)."""
    where = redact_url(url)
    try:
        resp = httpx.post(url, json=message.payload, timeout=timeout, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise DeliveryError(f"webhook {where}: {type(exc).__name__}: {exc}") from exc
    if resp.status_code >= 300:
        raise DeliveryError(f"webhook {where}: HTTP {resp.status_code} {resp.text[:200]}".strip())


def send_email(settings: Settings, to: list[str], message: Message) -> None:
    """One plain-text e-mail to every address of the rule, over SMTP."""
    if not settings.smtp_host:
        raise DeliveryError("e-mail notifications need NBCRON_SMTP_HOST", permanent=True)
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = settings.smtp_from, ", ".join(to), message.subject
    mail.set_content(message.text)
    try:
        with _smtp(settings) as smtp:
            if settings.smtp_user:
                smtp.login(settings.smtp_user, settings.smtp_password or "")
            smtp.send_message(mail)
    except (OSError, smtplib.SMTPException) as exc:
        raise DeliveryError(f"smtp {settings.smtp_host}:{settings.smtp_port}: {exc}") from exc


def _smtp(settings: Settings) -> smtplib.SMTP:
    host, port, timeout = (
        settings.smtp_host or "",
        settings.smtp_port,
        settings.notify_timeout_seconds,
    )
    mode = settings.smtp_tls.lower()
    if mode == "ssl":
        return smtplib.SMTP_SSL(host, port, timeout=timeout, context=ssl.create_default_context())
    smtp = smtplib.SMTP(host, port, timeout=timeout)
    if mode == "starttls":
        smtp.starttls(context=ssl.create_default_context())
    elif mode not in ("off", "none", "false", "no"):
        smtp.close()
        raise DeliveryError(f"smtp_tls must be starttls, ssl or off, not {mode!r}", permanent=True)
    return smtp


class Sender(Protocol):
    def __call__(self, channel: str, rule: dict[str, Any], message: Message) -> None: ...


def default_sender(settings: Settings) -> Sender:
    """Deliver to the rule's webhook or e-mail addresses."""

    def send(channel: str, rule: dict[str, Any], message: Message) -> None:
        if channel == "webhook" and rule.get("webhook"):
            send_webhook(rule["webhook"], message, timeout=settings.notify_timeout_seconds)
        elif channel == "email" and rule.get("email"):
            send_email(settings, list(rule["email"]), message)
        else:
            raise DeliveryError(f"the rule no longer has a {channel} channel", permanent=True)

    return send


def retry_delay(settings: Settings, attempts: int) -> float:
    """Exponential backoff: base, twice that, four times… capped at an hour."""
    return min(settings.notify_retry_seconds * 2 ** max(attempts - 1, 0), MAX_RETRY_SECONDS)


class Notifier:
    """Delivers pending notifications from a background thread of a worker process."""

    def __init__(self, store: Store, settings: Settings, *, sender: Sender | None = None) -> None:
        self.store, self.settings = store, settings
        self.sender = sender or default_sender(settings)
        self.lease = settings.notify_timeout_seconds * 3 + 30
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Notifier:
        self._thread = threading.Thread(target=self._loop, name="nbcron-notifier", daemon=True)
        self._thread.start()
        return self

    def wake(self, run_id: int | None = None) -> None:
        """A run just finished: look for its notifications now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                while self.deliver_due() and not self._stop.is_set():
                    pass
            except NbcronError as exc:
                log.warning("notifications: database unavailable: %s", exc)
            self._wake.wait(self.settings.notify_poll_seconds)

    def deliver_due(self, limit: int = 20) -> int:
        """Deliver up to `limit` due notifications; return how many were claimed."""
        rows = self.store.claim_notifications(limit=limit, lease=self.lease)
        for row in rows:
            self.deliver(row)
        return len(rows)

    def deliver(self, row: dict[str, Any]) -> None:
        """Send one claimed notification and record the outcome."""
        ctx = self.store.notification_context(row["run_id"])
        event = decide(ctx) if ctx else None
        if ctx is None or event is None:
            self._finish(row, "skipped", None, None)
            return
        message = compose(ctx, event, self.settings)
        try:
            self.sender(row["channel"], ctx.get("notify") or {}, message)
        except Exception as exc:  # any channel failure is logged and retried, never raised
            self._failed(row, event, exc)
            return
        self._finish(row, "sent", event, None)
        log.info(
            "notification sent",
            extra={"run_id": row["run_id"], "channel": row["channel"], "notify_event": event.value},
        )

    def _failed(self, row: dict[str, Any], event: Event, exc: Exception) -> None:
        error = str(exc) or type(exc).__name__
        final = (
            getattr(exc, "permanent", False) or row["attempts"] >= self.settings.notify_max_attempts
        )
        fields = {"run_id": row["run_id"], "channel": row["channel"], "attempt": row["attempts"]}
        if final:
            log.error("notification given up: %s", error, extra=fields)
            self._finish(row, "failed", event, error)
            return
        delay = retry_delay(self.settings, row["attempts"])
        log.warning("notification failed, retrying in %.1fs: %s", delay, error, extra=fields)
        self.store.retry_notification(row["id"], delay=delay, event=event.value, error=error)

    def _finish(
        self, row: dict[str, Any], status: str, event: Event | None, error: str | None
    ) -> None:
        self.store.finish_notification(
            row["id"],
            channel=row["channel"],
            status=status,
            event=event.value if event else None,
            error=error,
        )
