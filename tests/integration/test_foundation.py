"""The spine end to end: real HTTP API, real dispatcher, real Dramatiq worker, real Postgres/Redis."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
import pytest

from tests.support import Stack, wait_for, wait_run

EXAMPLE = {"name": "test", "executor": "shell", "command": "echo hello"}


def _count(database_url: str, table: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert row is not None
        return int(row[0])


def test_contract_example_runs_to_success_with_its_output(stack: Stack) -> None:
    with stack.client() as api:
        created = api.post("/api/tasks", json=EXAMPLE)
        assert created.status_code == 201, created.text
        task = created.json()
        assert task["name"] == "test" and task["command"] == "echo hello"

        triggered = api.post("/api/tasks/test/trigger")
        assert triggered.status_code == 202, triggered.text
        run = wait_run(api, triggered.json()["id"])

        assert run["status"] == "succeeded", run
        assert run["exit_code"] == 0
        assert run["trigger"] == "manual" and run["worker"]
        assert run["started_at"] and run["finished_at"]
        logs = api.get(f"/api/runs/{run['id']}/logs").json()
        assert "hello" in logs["text"]
        assert logs["finished"] is True
        history = api.get("/api/tasks/test/runs").json()["items"]
        assert [r["id"] for r in history] == [run["id"]]


def test_failing_command_records_exit_code_and_output(stack: Stack) -> None:
    with stack.client() as api:
        api.post(
            "/api/tasks",
            json={"name": "bad", "executor": "shell", "command": "echo oops >&2; exit 4"},
        )
        run = wait_run(api, api.post("/api/tasks/bad/trigger").json()["id"])
    assert run["status"] == "failed"
    assert run["exit_code"] == 4
    assert "oops" in run["error"]


def test_trigger_parameters_reach_the_command_as_environment(stack: Stack) -> None:
    with stack.client() as api:
        api.post(
            "/api/tasks",
            json={"name": "p", "executor": "shell", "command": 'echo "day=$NBCRON_PARAM_DAY"'},
        )
        body = {"parameters": {"day": "$(id); echo injected"}}
        run = wait_run(api, api.post("/api/tasks/p/trigger", json=body).json()["id"])
        text = api.get(f"/api/runs/{run['id']}/logs").json()["text"]
    assert run["status"] == "succeeded"
    assert text.strip() == "day=$(id); echo injected"


def test_health_is_open_and_everything_else_needs_a_key(api_stack: Stack) -> None:
    assert httpx.get(api_stack.base + "/health").json() == {"status": "ok"}
    with api_stack.client(key="") as anon, api_stack.client(key="nbc_dead_beef") as wrong:
        for client in (anon, wrong):
            resp = client.get("/api/tasks")
            assert resp.status_code == 401
            assert resp.headers["content-type"].startswith("application/problem+json")
            assert resp.json()["detail"]


def test_every_documented_operation_rejects_a_missing_key(api_stack: Stack) -> None:
    with api_stack.client() as api:
        schema = api.get("/schema/openapi.json").json()
    operations = [
        (method, path)
        for path, item in schema["paths"].items()
        for method in item
        if method in {"get", "post", "patch", "put", "delete"}
    ]
    assert len(operations) >= 12
    with api_stack.client(key="") as anon:
        for method, path in operations:
            concrete = path.replace("{ref}", "x").replace("{run_id}", "1").replace("{key_id}", "1")
            status = anon.request(method.upper(), concrete).status_code
            expected = 200 if path == "/health" else 401
            assert status == expected, f"{method.upper()} {path} answered {status}"


BAD_BODIES: list[tuple[str, Any, str | None]] = [
    ("missing name", {"executor": "shell", "command": "true"}, "name"),
    ("missing executor", {"name": "x"}, "executor"),
    (
        "wrong type",
        {"name": "x", "executor": "shell", "command": "true", "timeout_seconds": "soon"},
        "timeout_seconds",
    ),
    ("unknown executor", {"name": "x", "executor": "teleport", "command": "true"}, "executor"),
    (
        "bad cron",
        {"name": "x", "executor": "shell", "command": "true", "schedule": "61 * * * *"},
        "schedule",
    ),
    (
        "bad zone",
        {
            "name": "x",
            "executor": "shell",
            "command": "true",
            "schedule": "@daily",
            "timezone": "Mars/Olympus",
        },
        "timezone",
    ),
    ("empty name", {"name": "", "executor": "shell", "command": "true"}, "name"),
    ("long name", {"name": "n" * 101, "executor": "shell", "command": "true"}, "name"),
    ("digit name", {"name": "12345", "executor": "shell", "command": "true"}, "name"),
    ("missing command", {"name": "x", "executor": "shell"}, "command"),
    ("typo field", {"name": "x", "executor": "shell", "comand": "true"}, "comand"),
    ("not an object", ["name", "x"], None),
]


@pytest.mark.parametrize(("label", "body", "field"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_task_bodies_are_422_naming_the_field_and_write_nothing(
    api_stack: Stack, label: str, body: Any, field: str | None
) -> None:
    with api_stack.client() as api:
        resp = api.post("/api/tasks", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem = resp.json()
    assert problem["status"] == 422 and problem["detail"]
    if field is not None:
        assert problem["field"] == field, problem
    assert _count(api_stack.settings.database_url or "", "tasks") == 0


def test_invalid_json_is_400_and_bad_query_is_422(api_stack: Stack) -> None:
    with api_stack.client() as api:
        resp = api.post(
            "/api/tasks", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert resp.status_code == 400
        assert api.get("/api/tasks", params={"limit": 100000}).status_code == 422
        assert api.get("/api/runs", params={"status": "exploded"}).status_code == 422


def test_duplicate_name_is_409_and_unknown_objects_are_404(api_stack: Stack) -> None:
    with api_stack.client() as api:
        assert api.post("/api/tasks", json=EXAMPLE).status_code == 201
        dup = api.post("/api/tasks", json=EXAMPLE)
        assert dup.status_code == 409 and "already exists" in dup.json()["detail"]
        assert api.get("/api/tasks/nope").status_code == 404
        assert api.get("/api/tasks/999999").status_code == 404
        assert api.post("/api/tasks/nope/trigger").status_code == 404
        assert api.get("/api/runs/999999").status_code == 404
        assert api.post("/api/runs/999999/cancel").status_code == 404
        assert api.delete("/api/tasks/nope").status_code == 404
    assert _count(api_stack.settings.database_url or "", "tasks") == 1


def test_task_crud_by_id_and_name(api_stack: Stack) -> None:
    with api_stack.client() as api:
        task = api.post(
            "/api/tasks",
            json={
                **EXAMPLE,
                "schedule": "*/5 * * * *",
                "timezone": "Europe/Paris",
                "tags": ["etl"],
            },
        ).json()
        assert len(task["next_fire_times"]) == 5
        assert api.get(f"/api/tasks/{task['id']}").json()["name"] == "test"
        patched = api.patch("/api/tasks/test", json={"command": "echo bye", "enabled": False})
        assert patched.status_code == 200, patched.text
        assert patched.json()["command"] == "echo bye" and patched.json()["enabled"] is False
        bad = api.patch("/api/tasks/test", json={"schedule": "not cron"})
        assert bad.status_code == 422 and bad.json()["field"] == "schedule"
        assert api.get("/api/tasks/test").json()["command"] == "echo bye"
        listed = api.get("/api/tasks", params={"tag": "etl"}).json()
        assert [t["name"] for t in listed["items"]] == ["test"]
        assert api.delete("/api/tasks/test").status_code == 204
        assert api.get("/api/tasks/test").status_code == 404


def test_task_list_is_keyset_paginated(api_stack: Stack) -> None:
    with api_stack.client() as api:
        for i in range(7):
            api.post("/api/tasks", json={"name": f"t{i}", "executor": "shell", "command": "true"})
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
            page = api.get("/api/tasks", params=params).json()
            seen += [t["name"] for t in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    assert seen == [f"t{i}" for i in range(7)]


def test_cancel_a_queued_run(api_stack: Stack) -> None:
    # no dispatcher or worker runs here, so the run stays queued
    with api_stack.client() as api:
        api.post("/api/tasks", json=EXAMPLE)
        run = api.post("/api/tasks/test/trigger").json()
        assert run["status"] == "queued"
        cancelled = api.post(f"/api/runs/{run['id']}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        again = api.post(f"/api/runs/{run['id']}/cancel")
        assert again.status_code == 409


def test_idempotency_key_gives_the_same_run(api_stack: Stack) -> None:
    with api_stack.client() as api:
        api.post("/api/tasks", json=EXAMPLE)
        headers = {"Idempotency-Key": "abc-123"}
        first = api.post("/api/tasks/test/trigger", headers=headers).json()
        second = api.post("/api/tasks/test/trigger", headers=headers).json()
        third = api.post("/api/tasks/test/trigger").json()
    assert first["id"] == second["id"]
    assert third["id"] != first["id"]


def test_worker_registers_and_heartbeats(stack: Stack) -> None:
    with stack.client() as api:
        workers = wait_for(lambda: api.get("/api/workers").json(), what="a registered worker")
    assert workers[0]["alive"] is True
    assert workers[0]["queues"] == ["default"]


def test_keys_are_admin_only_shown_once_and_stored_hashed(api_stack: Stack) -> None:
    with api_stack.client() as admin:
        created = admin.post("/api/keys", json={"name": "ci", "role": "viewer"})
        assert created.status_code == 201
        key = created.json()["key"]
        listed = admin.get("/api/keys").json()
        assert all("key" not in k for k in listed)
    with psycopg.connect(api_stack.settings.database_url or "") as conn:
        rows = conn.execute("SELECT key_hash FROM api_keys").fetchall()
    assert key not in str(rows)
    with api_stack.client(key=key) as viewer:
        assert viewer.get("/api/tasks").status_code == 200
        assert viewer.post("/api/tasks", json=EXAMPLE).status_code == 403
        assert viewer.get("/api/keys").status_code == 403
    with api_stack.client() as admin:
        admin.delete(f"/api/keys/{created.json()['id']}")
    with api_stack.client(key=key) as revoked:
        assert revoked.get("/api/tasks").status_code == 401
