"""Embedded PostgreSQL and Valkey really start, keep their data, and leave no process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest
import redis

from service.config import Settings
from service.embedded import EmbeddedPostgres, EmbeddedServerError, EmbeddedValkey
from service.supervisor import run_up
from tests.support import REDIS_URL, ROOT, free_port


def _processes_mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line contains `text`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if text in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def _rows(url: str) -> list[tuple[str]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT note FROM kept ORDER BY note").fetchall()


def test_postgres_keeps_data_between_starts_and_stops_cleanly(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path)
    try:
        url = pg.start()
        assert url.startswith("postgresql://postgres@127.0.0.1:")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (note text)")
            conn.execute("INSERT INTO kept VALUES ('first start')")
        assert pg.pid is not None
        backends = psutil.Process(pg.pid).children(recursive=True)
        pg.stop()
        assert pg.pid is None
        assert not [p for p in backends if p.is_running()]
        assert not _processes_mentioning(str(tmp_path))

        assert pg.start() == url  # same recorded port, same pgdata
        assert _rows(url) == [("first start",)]
    finally:
        pg.stop()
    assert not _processes_mentioning(str(tmp_path))


def test_postgres_restarts_after_being_killed(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path)
    try:
        url = pg.start()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (note text)")
            conn.execute("INSERT INTO kept VALUES ('before kill')")
        assert pg.pid is not None
        os.kill(pg.pid, signal.SIGKILL)
        pg.stop()  # only reaps the dead process
        assert (pg.pgdata / "postmaster.pid").exists()  # stale lock left behind

        assert _rows(pg.start()) == [("before kill",)]
    finally:
        pg.stop()
    assert not _processes_mentioning(str(tmp_path))


def test_second_postgres_on_same_data_dir_is_refused(tmp_path: Path) -> None:
    first, second = EmbeddedPostgres(tmp_path), EmbeddedPostgres(tmp_path)
    try:
        first.start()
        with pytest.raises(EmbeddedServerError, match="already in use"):
            second.start()
        assert second.pid is None
    finally:
        second.stop()
        first.stop()
    assert not _processes_mentioning(str(tmp_path))


def test_valkey_answers_and_stops_cleanly(tmp_path: Path) -> None:
    valkey = EmbeddedValkey(tmp_path)
    try:
        url = valkey.start()
        assert url.startswith("redis://127.0.0.1:")
        client = redis.Redis.from_url(url)
        client.set("nbcron:test", "hello")
        assert client.get("nbcron:test") == b"hello"
        client.close()
        pid = valkey.pid
        assert pid is not None
        valkey.stop()
        assert valkey.pid is None
        assert not psutil.pid_exists(pid)

        assert valkey.start() == url  # the recorded port is tried first
    finally:
        valkey.stop()
    assert not _processes_mentioning(str(tmp_path))


def test_valkey_on_a_busy_port_fails_clearly(tmp_path: Path) -> None:
    valkey = EmbeddedValkey(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EmbeddedServerError, match=f"port {port} is in use"):
            valkey.start(port=port)
    assert valkey.pid is None
    assert not _processes_mentioning(str(tmp_path))


def test_up_refuses_a_busy_api_port_without_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(
            data_dir=tmp_path,
            api_port=port,
            database_url="postgresql://postgres@127.0.0.1:5432/postgres",
            broker_url="redis://127.0.0.1:6379/0",
        )
        assert run_up(settings) == 2
    out, err = capsys.readouterr()
    assert err == f"nbcron: port {port} is already in use (set --port or NBCRON_API_PORT)\n"
    assert out == ""
    assert list(tmp_path.iterdir()) == []
    assert not _processes_mentioning(str(tmp_path))


def test_up_uses_external_servers_when_urls_are_set(database_url: str, tmp_path: Path) -> None:
    """`nbcron up` with NBCRON_DATABASE_URL/NBCRON_BROKER_URL set starts no embedded server."""

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBCRON_")}
    env |= {
        "NBCRON_DATABASE_URL": database_url,
        "NBCRON_BROKER_URL": REDIS_URL,
        "NBCRON_BROKER_NAMESPACE": f"up-{port}",
        "NBCRON_DATA_DIR": str(tmp_path / "data"),
        "NBCRON_API_PORT": str(port),
        "NBCRON_DASHBOARD_PORT": str(free_port()),
        "NBCRON_KERNEL_POOL_SIZE": "0",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "up"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while "Press Ctrl-C to stop." not in "".join(lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            lines.append(proc.stdout.readline())
        text = "".join(lines)
        assert "embedded" not in text.split("Database", 1)[1], text
        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}
        assert not (tmp_path / "data" / "postgres").exists()
        assert not (tmp_path / "data" / "valkey").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert proc.returncode == 0
