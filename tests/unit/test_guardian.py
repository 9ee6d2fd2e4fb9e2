"""executors.guardian in this process, with real processes: env, clean close, restart, fork."""

from __future__ import annotations

import ast
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

from executors import ExecutorConfig, RunContext
from executors.guardian import (
    GUARD_MARKER,
    SCRIPT,
    Guardian,
    current_guardian,
    guard_env,
    start_guardian,
    stop_guardian,
)
from executors.shell import ShellExecutor

TREE = "setsid sleep 999 & sleep 999 & wait"
STUBBORN_TREE = "trap '' TERM; setsid sleep 999 & sleep 999 & wait"  # the sleeps ignore SIGTERM


def carrying(token: str) -> list[psutil.Process]:
    """Live processes whose environment holds NBCRON_GUARD=token (zombies do not count)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(GUARD_MARKER) == token:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def wait_until(predicate: Callable[[], object], *, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def spawn_tree(command: str, env: dict[str, str], *, count: int = 3) -> subprocess.Popen[bytes]:
    """`sh -c command` with `env` added, in its own session; returns once `count` carry the env."""
    proc = subprocess.Popen(
        ["/bin/sh", "-c", command], env={**os.environ, **env}, start_new_session=True
    )
    assert wait_until(lambda: len(carrying(env[GUARD_MARKER])) >= count), carrying(
        env[GUARD_MARKER]
    )
    return proc


def reap(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait(5)


@pytest.fixture
def guardian() -> Iterator[Guardian]:
    assert current_guardian() is None
    started = start_guardian(grace=1.0)
    assert started is not None
    try:
        yield started
    finally:
        leftovers = carrying(started.token)
        stop_guardian()
        for p in leftovers:
            p.kill()


def test_no_guardian_no_env() -> None:
    assert current_guardian() is None
    assert guard_env() == {}


def test_runs_outside_a_worker_carry_no_token() -> None:
    out: list[str] = []
    executor = ShellExecutor()
    spec = executor.parse_spec({"command": 'echo "guard=${NBCRON_GUARD-none}"'})
    executor.run(spec, RunContext(run_id=1, task_name="unit", log=out.append))
    assert "guard=none" in "".join(out)


def test_guardian_script_imports_only_the_standard_library() -> None:
    tree = ast.parse(SCRIPT.read_text())
    modules = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    modules |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    tops = {m.split(".")[0] for m in modules}
    assert tops <= set(sys.stdlib_module_names) | {"__future__"}, tops


def test_worker_hooks_start_and_stop_the_guardian() -> None:
    executor = ShellExecutor()
    executor.on_worker_start(ExecutorConfig(kill_grace_seconds=1.0))
    guardian = current_guardian()
    try:
        assert guardian is not None and guardian.alive()
        assert start_guardian(grace=1.0) is guardian  # once per process
        out: list[str] = []
        spec = executor.parse_spec({"command": 'echo "guard=$NBCRON_GUARD"'})
        executor.run(spec, RunContext(run_id=2, task_name="unit", log=out.append))
        assert f"guard={guardian.token}" in "".join(out)
    finally:
        executor.on_worker_stop()
    assert guardian.proc.returncode == 0
    assert current_guardian() is None and guard_env() == {}


def test_guardian_is_in_its_own_session(guardian: Guardian) -> None:
    assert os.getsid(guardian.proc.pid) == guardian.proc.pid != os.getsid(0)


@pytest.mark.parametrize("command", [TREE, STUBBORN_TREE], ids=["plain", "ignores-sigterm"])
def test_closing_stops_every_marked_process_and_leaves_nothing(
    guardian: Guardian, command: str
) -> None:
    tree = spawn_tree(command, guard_env())
    started = time.monotonic()
    stop_guardian()
    elapsed = time.monotonic() - started
    try:
        assert guardian.proc.returncode == 0
        assert carrying(guardian.token) == []
        assert elapsed < guardian.grace + 3, elapsed
    finally:
        reap(tree)


def test_closing_with_nothing_left_is_quick(guardian: Guardian) -> None:
    started = time.monotonic()
    stop_guardian()
    assert guardian.proc.returncode == 0
    assert time.monotonic() - started < 1.0


def test_a_dead_guardian_is_replaced_and_the_new_one_guards(
    guardian: Guardian, caplog: pytest.LogCaptureFixture
) -> None:
    old_token, old_proc = guardian.token, guardian.proc
    os.kill(old_proc.pid, signal.SIGKILL)
    assert wait_until(lambda: not guardian.alive())
    with caplog.at_level(logging.WARNING, logger="nbcron.executors.guardian"):
        env = guard_env()
    assert "starting a new one" in caplog.text
    assert old_proc.returncode == -signal.SIGKILL
    assert guardian.proc is not old_proc and guardian.alive()
    assert env == {GUARD_MARKER: guardian.token} and guardian.token != old_token
    assert os.getsid(guardian.proc.pid) == guardian.proc.pid

    tree = spawn_tree(TREE, env)
    try:
        stop_guardian()
        assert guardian.proc.returncode == 0
        assert carrying(guardian.token) == []
    finally:
        reap(tree)


def test_a_closed_guardian_is_not_restarted(guardian: Guardian) -> None:
    stop_guardian()
    assert not guardian.alive()
    assert guardian.env() == {}
    assert not guardian.alive()


def test_a_forked_child_does_not_keep_the_guardian_waiting(guardian: Guardian) -> None:
    pid = os.fork()
    if pid == 0:  # the child: hold on for a while, touching nothing
        time.sleep(3)
        os._exit(0)
    try:
        started = time.monotonic()
        stop_guardian()
        assert guardian.proc.returncode == 0
        assert time.monotonic() - started < 2.0
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
