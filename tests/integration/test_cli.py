"""The `nbcron` CLI's CONTRACT commands as a person or a script runs them: `python -m service.cli`
in a subprocess, against a real API, dispatcher and worker (configured by NBCRON_* only)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.executor_support import module_stack
from tests.support import ROOT, Stack, free_port, wait_for


@pytest.fixture(scope="module")
def stack(template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("cli-stack")
    with module_stack(template_db, folder) as running:
        yield running


def nbcron(stack: Stack, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with the stack's NBCRON_* environment (the admin key from its data dir)."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        env=stack.env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok(stack: Stack, *args: str, **env: str) -> str:
    done = nbcron(stack, *args, **env)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def as_json(stack: Stack, *args: str) -> Any:
    return json.loads(ok(stack, *args, "--json"))


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """A failed command says why on one stderr line, without a traceback."""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbcron: "), done.stderr
    return lines[0]


def test_tasks_add_list_show_pause_resume_rm(stack: Stack) -> None:
    out = ok(
        stack, "tasks", "add", "--name", "hello", "--command", "echo hi", "--schedule", "@daily"
    )
    assert re.fullmatch(r"created task hello \(id \d+\)\n", out)
    created = as_json(
        stack, "tasks", "add", "--name", "other", "--command", "true", "--keep-last", "3"
    )
    assert (created["name"], created["executor"], created["keep_last"]) == ("other", "shell", 3)

    table = ok(stack, "tasks", "list").splitlines()
    assert table[0].split()[:3] == ["ID", "NAME", "EXECUTOR"]
    assert any(line.split()[1:4] == ["hello", "shell", "@daily"] for line in table[1:])
    assert {t["name"] for t in as_json(stack, "tasks", "list")} == {"hello", "other"}

    shown = as_json(stack, "tasks", "show", "hello")
    assert shown["command"] == "echo hi" and len(shown["next_fire_times"]) == 5

    assert ok(stack, "tasks", "pause", "hello") == "task hello paused\n"
    assert as_json(stack, "tasks", "show", "hello")["enabled"] is False
    assert as_json(stack, "tasks", "resume", "hello")["enabled"] is True

    assert ok(stack, "tasks", "rm", "other") == "task other deleted\n"
    gone = nbcron(stack, "tasks", "show", "other")
    assert gone.returncode == 1 and "task 'other' not found" in one_line_error(gone)


def test_trigger_wait_shows_progress_and_exits_with_the_runs_status(stack: Stack) -> None:
    ok(stack, "tasks", "add", "--name", "works", "--command", "echo done-$((6*7))")
    done = nbcron(stack, "tasks", "trigger", "works", "--wait")
    assert done.returncode == 0, done.stderr
    run_id = int(re.fullmatch(r"run (\d+) succeeded\n", done.stdout).group(1))  # type: ignore[union-attr]
    assert f"run {run_id} succeeded" in done.stderr  # the progress display, on stderr

    ok(stack, "tasks", "add", "--name", "breaks", "--command", "echo oops >&2; exit 3")
    failed = nbcron(stack, "tasks", "trigger", "breaks", "--wait")
    assert failed.returncode == 3  # the command's own exit status
    assert re.fullmatch(r"run \d+ failed: exit code 3\noops\n", failed.stdout), failed.stdout
    final = json.loads(nbcron(stack, "tasks", "trigger", "breaks", "--wait", "--json").stdout)
    assert final["status"] == "failed" and final["exit_code"] == 3

    queued = as_json(stack, "tasks", "trigger", "works")
    assert queued["status"] == "queued" and queued["trigger"] == "manual"
    assert ok(stack, "runs", "logs", str(run_id)) == "done-42\n"


def test_runs_list_show_logs_cancel(stack: Stack) -> None:
    ok(stack, "tasks", "add", "--name", "sleeper", "--command", "echo started; sleep 60")
    run = as_json(stack, "tasks", "trigger", "sleeper")
    wait_for(
        lambda: "started" in ok(stack, "runs", "logs", str(run["id"])), what="the run to start"
    )
    assert ok(stack, "runs", "cancel", str(run["id"])).startswith(f"run {run['id']}: ")
    wait_for(
        lambda: as_json(stack, "runs", "show", str(run["id"]))["status"] == "cancelled",
        what="the cancel",
    )
    table = ok(stack, "runs", "list", "--task", "sleeper").splitlines()
    assert table[0].split()[:3] == ["ID", "TASK_NAME", "STATUS"]
    assert table[1].split()[:3] == [str(run["id"]), "sleeper", "cancelled"]
    listed = as_json(stack, "runs", "list", "--status", "cancelled")
    assert [r["id"] for r in listed] == [run["id"]]
    again = nbcron(stack, "runs", "cancel", str(run["id"]))
    assert again.returncode == 2 and "cannot be cancelled" in one_line_error(again)


def test_keys_create_prints_the_key_alone_and_it_works(stack: Stack, tmp_path: Path) -> None:
    out = ok(stack, "keys", "create", "--name", "ci", "--role", "viewer")
    assert out.count("\n") == 1 and " " not in out.strip()
    key = out.strip()
    empty_dir = str(tmp_path)  # no admin-key file: the CLI uses NBCRON_API_KEY alone
    assert ok(stack, "tasks", "list", NBCRON_API_KEY=key, NBCRON_DATA_DIR=empty_dir)
    refused = nbcron(stack, "tasks", "add", "--name", "x", "--command", "true", NBCRON_API_KEY=key)
    assert refused.returncode == 1 and "403" in one_line_error(refused)
    record = as_json(stack, "keys", "create", "--name", "ci2", "--role", "operator")
    assert record["role"] == "operator" and record["key"]


def test_friendly_errors_name_the_field_or_say_how_to_start_the_server(stack: Stack) -> None:
    bad = nbcron(
        stack, "tasks", "add", "--name", "bad", "--command", "x", "--schedule", "0 25 * * *"
    )
    line = one_line_error(bad)
    assert bad.returncode == 2 and "schedule" in line and "invalid hour field '25'" in line

    bad = nbcron(stack, "tasks", "add", "--name", "bad", "--command", "x", "--timeout", "-5")
    assert bad.returncode == 2 and "timeout_seconds" in one_line_error(bad)

    bad = nbcron(stack, "tasks", "add", "--name", "bad", "--executor", "nope")
    assert bad.returncode == 2 and "executor" in one_line_error(bad)

    closed = f"http://127.0.0.1:{free_port()}"
    offline = nbcron(stack, "tasks", "list", NBCRON_API_URL=closed)
    line = one_line_error(offline)
    assert offline.returncode == 1 and f"cannot reach the nbcron API at {closed}" in line
    assert "make run" in line and "nbcron up" in line
