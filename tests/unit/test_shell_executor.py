"""executors.shell and the executor registry, with real subprocesses and no database."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from executors import (
    ExecutorConfig,
    Outcome,
    Result,
    RunContext,
    SpecError,
    UnknownExecutorError,
    get_executor,
    known_kinds,
)
from executors.shell import ShellExecutor, ShellSpec, marked_processes, param_env

FAST_KILL = ExecutorConfig(kill_grace_seconds=1.0)


class Captured:
    """A log sink that keeps every chunk."""

    def __init__(self) -> None:
        self.chunks: list[str] = []

    def __call__(self, text: str) -> None:
        self.chunks.append(text)

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def unique_run_id() -> int:
    return 9_000_000 + random.randrange(1_000_000)


def make_ctx(log: Captured, **kwargs: Any) -> RunContext:
    kwargs.setdefault("run_id", unique_run_id())
    kwargs.setdefault("config", FAST_KILL)
    return RunContext(task_name="unit", log=log, **kwargs)


def run(command: str, ctx: RunContext) -> Result:
    spec = ShellExecutor().parse_spec({"command": command})
    return ShellExecutor().run(spec, ctx)


def wait_gone(run_id: int, *, within: float = 2.0) -> list[Any]:
    """Marked processes still alive after `within` seconds (an empty list is what we want)."""
    deadline = time.monotonic() + within
    while (alive := marked_processes(run_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def test_echo_succeeds_and_output_is_logged() -> None:
    log = Captured()
    result = run("echo hello", make_ctx(log))
    assert result == Result(outcome=Outcome.SUCCEEDED, exit_code=0)
    assert "hello" in log.text


def test_stderr_is_captured_too() -> None:
    log = Captured()
    assert run("echo oops >&2", make_ctx(log)).outcome is Outcome.SUCCEEDED
    assert "oops" in log.text


def test_non_zero_exit_fails_with_the_last_lines() -> None:
    log = Captured()
    result = run("for i in $(seq 1 30); do echo line$i; done; exit 3", make_ctx(log))
    assert result.outcome is Outcome.FAILED
    assert result.exit_code == 3
    assert result.error is not None
    assert "3" in result.error.splitlines()[0]
    assert "line30" in result.error
    assert "line1\n" not in result.error  # only the tail, not the whole log
    assert "line1\n" in log.text


def test_exit_without_output() -> None:
    result = run("exit 3", make_ctx(Captured()))
    assert result.outcome is Outcome.FAILED
    assert result.exit_code == 3
    assert result.error == "exit code 3"


def test_task_env_reaches_the_process() -> None:
    log = Captured()
    ctx = make_ctx(log, env={"GREETING": "bonjour"})
    assert run('echo "$GREETING $NBCRON_RUN_ID"', ctx).outcome is Outcome.SUCCEEDED
    assert log.text.strip() == f"bonjour {ctx.run_id}"


def test_parameters_are_inert_environment_data(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    params = {
        "name": f"; touch {marker}",
        "other": f"$(touch {marker})",
        "tick": f"`touch {marker}`",
    }
    log = Captured()
    command = (
        """printf '%s|%s|%s' "$NBCRON_PARAM_NAME" "$NBCRON_PARAM_OTHER" "$NBCRON_PARAM_TICK\""""
    )
    result = run(command, make_ctx(log, parameters=params))
    assert result.outcome is Outcome.SUCCEEDED
    assert log.text == "|".join(params.values())
    assert not marker.exists()


def test_param_env_names_and_json_values() -> None:
    env = param_env({"date": "2026-01-01", "n": 3, "my-flag": True, "xs": [1, 2]})
    assert env == {
        "NBCRON_PARAM_DATE": "2026-01-01",
        "NBCRON_PARAM_N": "3",
        "NBCRON_PARAM_MY_FLAG": "true",
        "NBCRON_PARAM_XS": "[1,2]",
    }


def test_timeout_kills_the_whole_tree() -> None:
    log = Captured()
    ctx = make_ctx(log, timeout_seconds=1)
    started = time.monotonic()
    result = run("sh -c 'sleep 999 & sleep 999 & wait'", ctx)
    elapsed = time.monotonic() - started
    assert result.outcome is Outcome.TIMED_OUT
    assert result.error is not None and "timed out" in result.error
    assert elapsed < 5
    assert wait_gone(ctx.run_id) == []


def test_setsid_grandchild_holding_stdout_does_not_hang_the_run() -> None:
    log = Captured()
    ctx = make_ctx(log)
    started = time.monotonic()
    result = run("setsid sh -c 'sleep 999' & echo started", ctx)
    elapsed = time.monotonic() - started
    assert result.outcome is Outcome.SUCCEEDED
    assert result.exit_code == 0
    assert "started" in log.text
    assert elapsed < 6
    assert wait_gone(ctx.run_id) == []


def test_cancel_event_stops_the_run() -> None:
    ctx = make_ctx(Captured())
    timer = threading.Timer(0.5, ctx.cancel_event.set)
    timer.start()
    started = time.monotonic()
    try:
        result = run("sleep 30", ctx)
    finally:
        timer.cancel()
    assert result.outcome is Outcome.CANCELLED
    assert time.monotonic() - started < 3
    assert wait_gone(ctx.run_id) == []


def test_cancelled_before_start_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    ctx = make_ctx(Captured())
    ctx.cancel_event.set()
    result = run(f"touch {marker}", ctx)
    assert result.outcome is Outcome.CANCELLED
    assert not marker.exists()


def test_cwd_is_honoured(tmp_path: Path) -> None:
    log = Captured()
    spec = ShellExecutor().parse_spec({"command": "pwd", "cwd": str(tmp_path)})
    assert ShellExecutor().run(spec, make_ctx(log)).outcome is Outcome.SUCCEEDED
    assert Path(log.text.strip()).resolve() == tmp_path.resolve()


def test_missing_cwd_fails_instead_of_raising(tmp_path: Path) -> None:
    log = Captured()
    spec = ShellExecutor().parse_spec({"command": "true", "cwd": str(tmp_path / "nope")})
    result = ShellExecutor().run(spec, make_ctx(log))
    assert result.outcome is Outcome.FAILED
    assert result.error


# Registry and spec parsing.


def test_unknown_executor_kind() -> None:
    with pytest.raises(UnknownExecutorError, match="nope"):
        get_executor("nope")


def test_shell_is_registered() -> None:
    assert "shell" in known_kinds()
    assert isinstance(get_executor("shell"), ShellExecutor)


def test_parse_spec_defaults() -> None:
    spec = get_executor("shell").parse_spec({"command": "echo hi"})
    assert spec == ShellSpec(command="echo hi", cwd=None, shell="/bin/sh")


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"command": ""}, "command"),
        ({}, "command"),
        ({"command": 5}, "command"),
        ({"command": "a\x00b"}, "command"),
        ({"command": "echo", "shell": ""}, "shell"),
        ({"command": "echo", "comand": "echo"}, "comand"),
        ({"command": "echo", "url": "http://example.com"}, "url"),
    ],
)
def test_parse_spec_errors_name_the_field(fields: dict[str, Any], bad: str) -> None:
    with pytest.raises(SpecError) as info:
        get_executor("shell").parse_spec(fields)
    assert info.value.field == bad
    assert bad in str(info.value)


def test_error_tail_keeps_lines_that_arrive_in_several_chunks() -> None:
    from executors.shell import _Tail

    tail = _Tail()
    for chunk in ("first li", "ne\nsecond ", "line\nno newline at the e", "nd"):
        tail.add(chunk)
    assert tail.text() == "first line\nsecond line\nno newline at the end"
