"""Migrations: in order, once, checksummed, safe twice and concurrently; the schema fits the SQL."""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from service.errors import MigrationError
from service.migrate import MIGRATIONS_DIR, discover, migrate
from service.store import queries
from tests.support import PG_URL, ROOT, db_url, require_servers


@pytest.fixture
def empty_db() -> Iterator[str]:
    require_servers()
    name = f"nbcron_mig_{secrets.token_hex(6)}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield db_url(name)
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _applied(url: str) -> list[tuple[int, str]]:
    with psycopg.connect(url) as conn:
        return [(r[0], r[1]) for r in conn.execute("SELECT version, name FROM schema_migrations")]


def test_applies_in_order_once(empty_db: str) -> None:
    names = [m.name for m in discover()]
    assert migrate(empty_db) == names
    assert migrate(empty_db) == []
    assert [n for _, n in _applied(empty_db)] == names


def test_two_processes_at_once_apply_each_file_once(empty_db: str) -> None:
    env = {"NBCRON_DATABASE_URL": empty_db, "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "service.cli", "migrate"]
    procs = [
        subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    applied = "\n".join(f"applied {m.name}" for m in discover())
    stdouts = sorted(o[0].strip() for o in outputs)
    assert stdouts == sorted(["database is up to date", applied]), outputs
    assert len(_applied(empty_db)) == len(discover())


def test_an_edited_applied_migration_is_refused(empty_db: str, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, folder)
    migrate(empty_db, directory=folder)
    first = sorted(folder.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match="edited"):
        migrate(empty_db, directory=folder)


def test_a_failing_migration_leaves_nothing_half_applied(empty_db: str, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, folder)
    broken = folder / f"{len(discover()) + 1:04d}_broken.sql"
    broken.write_text("CREATE TABLE half_done (id int);\nSELECT * FROM no_such_table;\n")
    with pytest.raises(MigrationError, match="broken"):
        migrate(empty_db, directory=folder)
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT to_regclass('half_done')").fetchone() == (None,)
    assert len(_applied(empty_db)) == len(discover())


def test_every_runtime_query_fits_the_migrated_schema(empty_db: str) -> None:
    """Each named block in queries.sql is prepared by Postgres against the migrated database."""
    migrate(empty_db)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        for name, text in queries().items():
            order: list[str] = []

            def number(match: re.Match[str], order: list[str] = order) -> str:
                if match.group(1) not in order:
                    order.append(match.group(1))
                return f"${order.index(match.group(1)) + 1}"

            statement = re.sub(r"%\((\w+)\)s", number, text).replace("%%", "%").rstrip(";")
            try:
                conn.execute(f"PREPARE check_{name} AS {statement}")
            except psycopg.Error as exc:
                pytest.fail(f"query {name} does not fit the schema: {exc}")
