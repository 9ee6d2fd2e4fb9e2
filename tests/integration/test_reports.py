"""Scheduled reports end to end with the repository's example notebooks (`notebooks/`): the task's
stable report link, pruning by keep_last, and delivery of the report link by webhook and e-mail.
Real API, dispatcher, worker, kernels, a loopback webhook receiver and a loopback SMTP server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller

from tests.integration.executor_support import module_stack
from tests.support import ROOT, Stack, free_port, wait_for, wait_run, webhook_receiver

PUBLIC = "https://reports.example.org"


class Hooks:
    """Webhook bodies received on loopback."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.url = ""


class Mailbox:
    """An aiosmtpd handler that keeps every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture(scope="module")
def hooks() -> Iterator[Hooks]:
    state = Hooks()
    with webhook_receiver(lambda body: state.bodies.append(json.loads(body)) or 200) as url:
        state.url = url
        yield state


@pytest.fixture(scope="module")
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    box, port = Mailbox(), free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield box, port
    controller.stop()


@pytest.fixture(scope="module")
def stack(
    template_db: str, tmp_path_factory: pytest.TempPathFactory, mailbox: tuple[Mailbox, int]
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("reports-stack")
    with module_stack(
        template_db,
        folder,
        notebooks_dir=ROOT / "notebooks",
        public_url=PUBLIC,
        smtp_host="127.0.0.1",
        smtp_port=mailbox[1],
        smtp_tls="off",
        notify_poll_seconds=0.5,
    ) as running:
        yield running


def create(api: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    resp = api.post("/api/tasks", json=body)
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def run_once(api: httpx.Client, name: str, **parameters: Any) -> dict[str, Any]:
    resp = api.post(f"/api/tasks/{name}/trigger", json={"parameters": parameters})
    assert resp.status_code == 202, resp.text
    return wait_run(api, resp.json()["id"], timeout=90)


def artifact_names(api: httpx.Client, run_id: int) -> set[str]:
    return {a["name"] for a in api.get(f"/api/runs/{run_id}/artifacts").json()}


def test_the_report_link_serves_the_latest_success_and_keep_last_prunes(stack: Stack) -> None:
    with stack.client() as api:
        task = create(
            api,
            {
                "name": "daily-report",
                "executor": "notebook",
                "notebook": "daily_report.ipynb",
                "parameters": {"days": 3},
                "schedule": "0 7 * * *",
                "keep_last": 2,
            },
        )
        assert task["keep_last"] == 2
        none_yet = api.get("/api/tasks/daily-report/report")
        assert none_yet.status_code == 404
        assert "no successful run" in none_yet.json()["detail"]

        runs = [run_once(api, "daily-report", region=r) for r in ("all", "eu", "us")]
        assert [r["status"] for r in runs] == ["succeeded"] * 3, runs
        report = api.get(f"/api/tasks/{task['id']}/report")
        assert report.status_code == 200
        assert report.headers["content-type"].startswith("text/html")
        assert report.headers["content-security-policy"] == "sandbox"
        assert report.headers["x-content-type-options"] == "nosniff"
        assert report.headers["x-nbcron-run-id"] == str(runs[2]["id"])
        assert "region: us" in report.text and "avg_order" in report.text  # the Polars summary
        assert "data:image/png;base64" in report.text  # the chart
        assert api.get("/api/tasks/daily-report/report").content == report.content  # by name too

        assert artifact_names(api, runs[0]["id"]) == set()  # beyond keep_last=2: pruned
        assert artifact_names(api, runs[2]["id"]) == {"output.ipynb", "report.html"}

        failed = run_once(api, "daily-report", region="nowhere")  # no orders: the check fails
        assert failed["status"] == "failed" and "no orders for region" in failed["error"]
        assert artifact_names(api, failed["id"]) == {"output.ipynb", "report.html"}
        latest = api.get("/api/tasks/daily-report/report")
        assert latest.headers["x-nbcron-run-id"] == str(runs[2]["id"])  # still the last success
        assert artifact_names(api, runs[1]["id"]) == set()


def test_keep_last_is_validated_and_can_be_changed(stack: Stack) -> None:
    with stack.client() as api:
        body = {"name": "k", "executor": "shell", "command": "true", "keep_last": 0}
        bad = api.post("/api/tasks", json=body)
        assert bad.status_code == 422 and bad.json()["field"] == "keep_last"
        task = create(api, body | {"keep_last": None})
        assert task["keep_last"] is None
        assert api.patch("/api/tasks/k", json={"keep_last": 5}).json()["keep_last"] == 5
        assert api.get("/api/tasks/no-such-task/report").status_code == 404


def test_data_quality_fails_the_run_and_the_report_link_is_delivered(
    stack: Stack, hooks: Hooks, mailbox: tuple[Mailbox, int]
) -> None:
    box, _ = mailbox
    with stack.client() as api:
        notify = {"on": ["success", "failure"], "webhook": hooks.url, "email": ["team@example.org"]}
        task = create(
            api,
            {
                "name": "orders-quality",
                "executor": "notebook",
                "notebook": "data_quality.ipynb",
                "notify": notify,
            },
        )
        good = run_once(api, "orders-quality")
        bad = run_once(api, "orders-quality", inject_bad_rows=3)
    assert good["status"] == "succeeded", good
    assert bad["status"] == "failed" and "data quality check(s) failed" in bad["error"]
    assert "order_id unique" in bad["error"] and "known regions" in bad["error"]

    wait_for(lambda: len(hooks.bodies) >= 2 and len(box.messages) >= 2, what="deliveries")
    by_run = {b["run_id"]: b for b in hooks.bodies}
    stable = f"{PUBLIC}/api/tasks/{task['id']}/report"
    assert by_run[good["id"]]["report"] == stable
    assert f"report: {stable}" in by_run[good["id"]]["text"]
    assert by_run[bad["id"]]["report"] == f"{PUBLIC}/api/runs/{bad['id']}/artifacts/report.html"
    mails = {str(m["Subject"]): m.get_payload() for m in box.messages}
    success_mail = next(body for subject, body in mails.items() if "succeeded" in subject)
    assert f"report: {stable}" in success_mail
