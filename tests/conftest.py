"""Shared fixtures: a migrated template database cloned per test, a Redis namespace per test,
and a real API + dispatcher + worker stack. Missing servers fail the run; nothing skips."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.auth import ensure_admin_key
from service.config import Settings
from service.store import Store
from tests.support import (
    REDIS_URL,
    Stack,
    clear_namespace,
    ensure_template,
    free_port,
    fresh_database,
    require_servers,
    running_api,
)


@pytest.fixture(scope="session")
def template_db() -> str:
    require_servers()
    return ensure_template()


@pytest.fixture
def database_url(template_db: str) -> Iterator[str]:
    with fresh_database(template_db) as url:
        yield url


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = f"nbtest-{uuid.uuid4().hex[:10]}"
    yield ns
    clear_namespace(ns)


@pytest.fixture
def settings(database_url: str, namespace: str, tmp_path: Path) -> Settings:
    port = free_port()
    return Settings(
        database_url=database_url,
        broker_url=REDIS_URL,
        broker_namespace=namespace,
        data_dir=tmp_path / "data",
        api_port=port,
        api_url=f"http://127.0.0.1:{port}",
        heartbeat_interval_seconds=1.0,
        heartbeat_timeout_seconds=6.0,
        poll_interval_seconds=0.5,
        kernel_pool_size=0,  # only the notebook suite (its own stack) warms kernels
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    assert settings.database_url
    with Store(settings.database_url, min_size=1, max_size=4) as s:
        yield s


@pytest.fixture
def admin_key(store: Store, settings: Settings) -> str:
    ensure_admin_key(store, settings.admin_key_path)
    return settings.admin_key_path.read_text().strip()


@pytest.fixture
def api_stack(settings: Settings, admin_key: str, tmp_path: Path) -> Iterator[Stack]:
    """Only the API process (for request/response tests)."""
    with running_api(settings, admin_key, tmp_path) as stack:
        yield stack


@pytest.fixture
def stack(api_stack: Stack) -> Iterator[Stack]:
    """API, one dispatcher and one worker."""
    api_stack.start("dispatcher")
    api_stack.start("worker")
    yield api_stack
