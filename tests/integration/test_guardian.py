"""The run guardian against real worker deaths: a run's whole tree, `setsid` grandchildren
included, is gone within seconds of its worker being SIGKILLed.

The first tests run the worker side (the shell executor with its worker hooks) in a plain Python
subprocess so it can be killed; the last ones use a real `nbcron worker` on Postgres and Redis.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

from executors.guardian import GUARD_MARKER
from executors.shell import marked_processes
from tests.support import ROOT, Stack, wait_for

GRACE = 1.0
TREE = "setsid sleep 999 & sleep 999 & wait"
STUBBORN_TREE = "trap '' TERM; setsid sleep 999 & sleep 999 & wait"  # the sleeps ignore SIGTERM

# The worker side: start the executors' worker hooks (the guardian), then run one shell command.
WORKER_SIDE = """
import sys
from executors import ExecutorConfig, RunContext
from executors.shell import ShellExecutor

executor = ShellExecutor()
executor.on_worker_start(ExecutorConfig(kill_grace_seconds=float(sys.argv[3])))
spec = executor.parse_spec({"command": sys.argv[1]})
executor.run(spec, RunContext(run_id=int(sys.argv[2]), task_name="guardian"))
"""


def unique_run_id() -> int:
    return 8_000_000 + random.randrange(1_000_000)


def gone_within(found: Callable[[], list[psutil.Process]], seconds: float) -> list[psutil.Process]:
    """What `found` still returns after `seconds` (an empty list is what we want)."""
    deadline = time.monotonic() + seconds
    while (alive := found()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def find_guardian(worker_pid: int) -> psutil.Process | None:
    """The worker's guardian (its child running `_guardian_main.py`), if started yet."""
    for child in psutil.Process(worker_pid).children():
        with contextlib.suppress(psutil.Error):
            if any(part.endswith("_guardian_main.py") for part in child.cmdline()):
                return child
    return None


def guardian_of(worker_pid: int) -> psutil.Process:
    guardian = find_guardian(worker_pid)
    assert guardian is not None, f"worker {worker_pid} has no guardian"
    return guardian


def guard_token(proc: psutil.Process) -> str:
    return proc.cmdline()[-2]  # [python, -I, -S, script, token, grace]


def escaped_the_session(procs: list[psutil.Process]) -> bool:
    """At least two sessions among the run's processes: the `setsid` grandchild left the run's."""
    sessions = set()
    for p in procs:
        try:
            sessions.add(os.getsid(p.pid))
        except ProcessLookupError:
            continue
    return len(sessions) >= 2


@pytest.fixture
def run_id() -> Iterator[int]:
    """A fresh run id; whatever still carries it afterwards is killed (a failed test's tree)."""
    rid = unique_run_id()
    yield rid
    for p in marked_processes(rid):
        p.kill()


@pytest.fixture
def start_worker_side(run_id: int) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """Starts the worker side in its own process (and group); returns once the tree is up."""
    started: list[subprocess.Popen[bytes]] = []

    def start(command: str) -> subprocess.Popen[bytes]:
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER_SIDE, command, str(run_id), str(GRACE)],
            cwd=ROOT,
            start_new_session=True,
        )
        started.append(worker)
        wait_for(lambda: len(marked_processes(run_id)) >= 3, timeout=15, what="the run's tree")
        assert escaped_the_session(marked_processes(run_id))
        return worker

    yield start
    for worker in started:  # a failed test's worker: killing it sets its guardian off
        worker.kill()
        worker.wait(5)


@pytest.mark.parametrize("command", [TREE, STUBBORN_TREE], ids=["plain", "ignores-sigterm"])
@pytest.mark.parametrize("how", ["kill", "killpg"])
def test_sigkilled_worker_takes_its_whole_run_tree_along(
    run_id: int, start_worker_side: Callable[[str], subprocess.Popen[bytes]], command: str, how: str
) -> None:
    worker = start_worker_side(command)
    guardian = guardian_of(worker.pid)
    killed = time.monotonic()
    # killpg: the worker's whole process group; the guardian is not in it and does its job
    (os.killpg if how == "killpg" else os.kill)(worker.pid, signal.SIGKILL)
    worker.wait(5)
    assert gone_within(lambda: marked_processes(run_id), GRACE + 4) == []
    assert time.monotonic() - killed < GRACE + 4
    assert wait_for(lambda: is_gone(guardian.pid), timeout=5, what="the guardian to exit")


def test_sigterm_to_the_worker_alone_is_enough_too(
    run_id: int, start_worker_side: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    worker = start_worker_side(TREE)
    guardian = guardian_of(worker.pid)
    worker.terminate()  # no handler: the worker dies without running its stop hooks
    worker.wait(5)
    assert gone_within(lambda: marked_processes(run_id), GRACE + 4) == []
    assert wait_for(lambda: is_gone(guardian.pid), timeout=5, what="the guardian to exit")


# -- a real `nbcron worker` ------------------------------------------------------------------
# Run ids restart at 1 in every test database, so a run's processes are told apart from other
# stacks' by the worker's guardian token as well.


def run_tree(rid: int, token: str) -> list[psutil.Process]:
    """Live processes of run `rid` guarded by `token`."""
    return [p for p in marked_processes(rid) if _env_of(p).get(GUARD_MARKER) == token]


def _env_of(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except psutil.Error:
        return {}


def create_tree_task(stack: Stack, name: str) -> None:
    with stack.client() as api:
        resp = api.post("/api/tasks", json={"name": name, "executor": "shell", "command": TREE})
        assert resp.status_code == 201, resp.text


def trigger(stack: Stack, name: str) -> int:
    with stack.client() as api:
        return int(api.post(f"/api/tasks/{name}/trigger").json()["id"])


def booted_guardian(stack: Stack) -> psutil.Process:
    """The stack worker's guardian, once the worker has started its executors."""
    pid = stack.procs["worker"].pid
    return wait_for(lambda: find_guardian(pid), timeout=30, what="the worker's guardian")


def sigkill_worker_and_check(stack: Stack, rid: int, guardian: psutil.Process) -> None:
    token = guard_token(guardian)
    try:
        wait_for(lambda: len(run_tree(rid, token)) >= 3, timeout=30, what="the guarded tree")
        stack.stop("worker", signal.SIGKILL)
        assert gone_within(lambda: run_tree(rid, token), 5.0) == []
        assert wait_for(lambda: is_gone(guardian.pid), timeout=5, what="the guardian to exit")
    finally:
        for p in marked_processes(rid):
            if _env_of(p).get(GUARD_MARKER) == token:
                p.kill()


def test_real_worker_sigkilled_mid_run_leaves_no_process(stack: Stack) -> None:
    create_tree_task(stack, "guarded")
    guardian = booted_guardian(stack)
    sigkill_worker_and_check(stack, trigger(stack, "guarded"), guardian)


def test_real_worker_guards_a_run_it_takes_as_it_boots(api_stack: Stack) -> None:
    create_tree_task(api_stack, "at-boot")
    rid = trigger(api_stack, "at-boot")
    api_stack.start("dispatcher")
    time.sleep(1.0)  # the message waits in the queue for the worker
    api_stack.start("worker")
    wait_for(lambda: len(marked_processes(rid)) >= 3, timeout=30, what="the run's tree")
    try:
        guardian = guardian_of(api_stack.procs["worker"].pid)
        assert len(run_tree(rid, guard_token(guardian))) >= 3, "the run started unguarded"
    except AssertionError:
        api_stack.stop("worker")  # cancels the unguarded run
        raise
    sigkill_worker_and_check(api_stack, rid, guardian)


def test_real_worker_stopped_cleanly_stops_its_guardian(stack: Stack) -> None:
    create_tree_task(stack, "stopped")
    guardian = booted_guardian(stack)
    token = guard_token(guardian)
    rid = trigger(stack, "stopped")
    wait_for(lambda: len(run_tree(rid, token)) >= 3, timeout=30, what="the guarded tree")
    stack.stop("worker")  # SIGTERM: runs are cancelled, then the executors' stop hooks run
    assert run_tree(rid, token) == []
    assert wait_for(lambda: is_gone(guardian.pid), timeout=5, what="the guardian to exit")
