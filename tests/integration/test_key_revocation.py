"""Revoked keys stop working although every API process caches the principals it has seen.

The revoking statement sends `NOTIFY nbcron_keys`; each process's listener clears its cache. The
cache TTL (`auth_cache_seconds`) bounds a revocation nobody announced (an UPDATE made by hand),
and a process whose listener lost its connection stops trusting its cache until it is back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from service.config import Settings
from service.models import Role
from service.store import Store
from tests.support import Stack, running_api, wait_for

LONG_TTL = 3600.0  # so that only the NOTIFY can explain a refusal


@contextmanager
def api(settings: Settings, admin_key: str, logs: Path, **overrides: Any) -> Iterator[Stack]:
    """An API on the test database with some settings changed, healthy when the block starts."""
    with running_api(settings.with_overrides(**overrides), admin_key, logs) as stack:
        yield stack


def new_key(stack: Stack, role: Role = Role.VIEWER) -> dict[str, Any]:
    with stack.client() as admin:
        resp = admin.post("/api/keys", json={"name": "revocable", "role": role.value})
    assert resp.status_code == 201, resp.text
    return resp.json()


def statuses(stack: Stack, key: str, connections: int = 8) -> list[int]:
    """GET /api/tasks with `key` on fresh connections (spread over the API's processes)."""
    out = []
    for _ in range(connections):
        with stack.client(key=key) as client:
            out.append(client.get("/api/tasks").status_code)
    return out


def revoke(stack: Stack, key_id: int) -> None:
    with stack.client() as admin:
        assert admin.delete(f"/api/keys/{key_id}").status_code == 200


def listeners(database_url: str) -> list[int]:
    """Backend pids of the API processes' revocation listeners."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND query = 'LISTEN \"nbcron_keys\"'"
        ).fetchall()
    return [r[0] for r in rows]


def test_a_cached_key_is_refused_after_its_revocation_by_every_process(
    settings: Settings, admin_key: str, tmp_path: Path
) -> None:
    with api(settings, admin_key, tmp_path, api_workers=2, auth_cache_seconds=LONG_TTL) as stack:
        wait_for(lambda: len(listeners(settings.database_url or "")) == 2, what="2 listeners")
        key = new_key(stack)
        assert statuses(stack, key["key"]) == [200] * 8  # cached wherever it was served
        with stack.client(key=key["key"]) as kept:  # a kept-alive connection, cache warm
            assert kept.get("/api/tasks").status_code == 200
            revoke(stack, key["id"])
            wait_for(lambda: kept.get("/api/tasks").status_code == 401, what="kept refused")
        wait_for(lambda: statuses(stack, key["key"]) == [401] * 8, what="every process refuses")


def test_the_revoking_process_refuses_the_key_from_the_next_request(
    settings: Settings, admin_key: str, tmp_path: Path
) -> None:
    with api(settings, admin_key, tmp_path, auth_cache_seconds=LONG_TTL) as stack:
        key = new_key(stack, Role.OPERATOR)
        with stack.client(key=key["key"]) as client:
            token = client.post("/api/auth/token").json()["access_token"]
        with stack.client(key=token) as client:
            assert client.get("/api/tasks").status_code == 200
            revoke(stack, key["id"])
            assert client.get("/api/tasks").status_code == 401
        assert statuses(stack, key["key"], connections=1) == [401]


def test_an_unannounced_revocation_ends_with_the_cache_ttl(
    settings: Settings, admin_key: str, tmp_path: Path, store: Store
) -> None:
    with api(settings, admin_key, tmp_path, auth_cache_seconds=1.0) as stack:
        wait_for(lambda: listeners(settings.database_url or ""), what="the listener")
        key = new_key(stack)
        with stack.client(key=key["key"]) as client:
            assert client.get("/api/tasks").status_code == 200
            store.revoke_api_key(key["id"])  # a plain UPDATE: no NOTIFY
            wait_for(lambda: client.get("/api/tasks").status_code == 401, what="TTL backstop")


def test_a_lost_listener_turns_the_cache_off_until_it_is_back(
    settings: Settings, admin_key: str, tmp_path: Path
) -> None:
    url = settings.database_url or ""
    with api(settings, admin_key, tmp_path, auth_cache_seconds=LONG_TTL) as stack:
        first = wait_for(lambda: listeners(url), what="the listener")
        key, other = new_key(stack), new_key(stack)
        assert statuses(stack, key["key"], 1) == statuses(stack, other["key"], 1) == [200]
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (first[0],))
        with stack.client(key=key["key"]) as client:
            assert client.get("/api/tasks").status_code == 200  # still served, from the table
        back = wait_for(lambda: [p for p in listeners(url) if p not in first], what="reconnect")
        assert back
        revoke(stack, other["id"])
        wait_for(lambda: statuses(stack, other["key"], 1) == [401], what="refused after reconnect")
        assert statuses(stack, key["key"], 1) == [200]
