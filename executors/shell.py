"""Shell executor: a command in its own process group, output streamed, the whole tree killed.

Parameters reach the process as `NBCRON_PARAM_<NAME>` environment variables and are never spliced
into the command text, so a value like `; rm -rf ~` is inert data. In a worker, each run also
carries the worker's guardian token (`executors.guardian`), so it dies with the worker.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import select
import signal
import subprocess
import time
from typing import Annotated, Any

import msgspec
import psutil

from executors import Executor, ExecutorConfig, Outcome, Result, RunContext, SpecError
from executors.guardian import guard_env, start_guardian, stop_guardian

RUN_MARKER = "NBCRON_RUN_ID"
_PARAM_NAME_RE = re.compile(r"[^A-Za-z0-9_]")
_POLL_SECONDS = 0.1
_OUTPUT_GRACE_SECONDS = 2.0
_TAIL_LINES = 20


class ShellSpec(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Fields of a shell task."""

    command: Annotated[str, msgspec.Meta(min_length=1, max_length=65536)]
    cwd: str | None = None
    shell: Annotated[str, msgspec.Meta(min_length=1)] = "/bin/sh"


def param_env(parameters: dict[str, Any]) -> dict[str, str]:
    """`NBCRON_PARAM_<NAME>` variables for the run's parameters (values as text or JSON)."""
    out: dict[str, str] = {}
    for name, value in parameters.items():
        key = "NBCRON_PARAM_" + _PARAM_NAME_RE.sub("_", str(name)).upper()
        out[key] = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    return out


def marked_processes(run_id: int) -> list[psutil.Process]:
    """Every live process that carries this run's marker in its environment."""
    wanted = str(run_id)
    found: list[psutil.Process] = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(RUN_MARKER) == wanted:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def kill_tree(proc: subprocess.Popen[bytes], run_id: int, *, grace: float) -> None:
    """SIGTERM the process group and every process marked with the run, then SIGKILL stragglers.

    The marker catches descendants that left the group with `setsid` or were re-parented.
    """
    targets = _tree(proc, run_id)
    _signal_all(proc, targets, signal.SIGTERM)
    _, alive = psutil.wait_procs(targets, timeout=grace)
    if alive or proc.poll() is None:
        _signal_all(proc, alive + _tree(proc, run_id), signal.SIGKILL)
        psutil.wait_procs(alive, timeout=grace)


def _tree(proc: subprocess.Popen[bytes], run_id: int) -> list[psutil.Process]:
    procs = {p.pid: p for p in marked_processes(run_id)}
    try:
        root = psutil.Process(proc.pid)
        procs[root.pid] = root
        procs.update({c.pid: c for c in root.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    return list(procs.values())


def _signal_all(proc: subprocess.Popen[bytes], targets: list[psutil.Process], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    for p in targets:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)


class _Tail:
    """Keeps the last lines of output for the run's `error` field (lines may span chunks)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._partial = ""

    def add(self, text: str) -> None:
        parts = (self._partial + text).split("\n")
        self._partial = parts.pop()
        self.lines.extend(parts)
        del self.lines[:-_TAIL_LINES]

    def text(self) -> str:
        lines = [*self.lines, self._partial] if self._partial else self.lines
        return "\n".join(lines[-_TAIL_LINES:])


class _Supervisor:
    """One thread watches the output pipe, the exit (a pidfd), the time limit and cancellation.

    No thread per run and no polling delay: the process's exit or output wakes `select` at once.
    """

    def __init__(self, proc: subprocess.Popen[bytes], ctx: RunContext, tail: _Tail) -> None:
        assert proc.stdout is not None
        self.proc, self.ctx, self.tail = proc, ctx, tail
        self.out = proc.stdout.fileno()
        os.set_blocking(self.out, False)
        self.deadline = time.monotonic() + ctx.timeout_seconds if ctx.timeout_seconds else None
        self.outcome: Outcome | None = None
        self.exited_at: float | None = None

    def run(self) -> Outcome | None:
        pidfd = _pidfd(self.proc.pid)
        try:
            while self._step(pidfd):
                pass
        finally:
            if pidfd is not None:
                os.close(pidfd)
        return self.outcome

    def _step(self, pidfd: int | None) -> bool:
        """One wait; False once the output is closed (or abandoned after the process ended)."""
        self._check_limits()
        watch = [self.out] + ([pidfd] if pidfd is not None and self.exited_at is None else [])
        ready, _, _ = select.select(watch, [], [], _POLL_SECONDS)
        if self.out in ready and not self._read():
            return False
        if self.exited_at is None and self.proc.poll() is not None:
            self.exited_at = time.monotonic()
        return not self._output_held_too_long()

    def _read(self) -> bool:
        try:
            chunk = os.read(self.out, 65536)
        except BlockingIOError:
            return True
        if chunk:
            text = chunk.decode("utf-8", errors="replace")
            self.tail.add(text)
            self.ctx.log(text)
        return bool(chunk)

    def _check_limits(self) -> None:
        if self.outcome is not None or self.exited_at is not None:
            return
        if self.ctx.cancel_event.is_set():
            self.outcome = Outcome.CANCELLED
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            self.outcome = Outcome.TIMED_OUT
        if self.outcome is not None:
            kill_tree(self.proc, self.ctx.run_id, grace=self.ctx.config.kill_grace_seconds)

    def _output_held_too_long(self) -> bool:
        """The command ended but a background child still holds stdout: kill it, then give up."""
        if self.exited_at is None:
            return False
        held = time.monotonic() - self.exited_at
        if held > _OUTPUT_GRACE_SECONDS:
            kill_tree(self.proc, self.ctx.run_id, grace=self.ctx.config.kill_grace_seconds)
        return held > 2 * _OUTPUT_GRACE_SECONDS


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux, or an old kernel: select times out instead
        return None


@functools.cache
def _base_env() -> dict[str, str]:
    """The process's environment, decoded once (`dict(os.environ)` per run is measurable);
    `on_worker_start` reads it afresh."""
    return dict(os.environ)


class ShellExecutor(Executor):
    kind = "shell"
    spec_type = ShellSpec

    def validate(self, spec: Any) -> None:
        if "\x00" in spec.command:
            raise SpecError("command must not contain NUL bytes", field="command")

    def on_worker_start(self, config: ExecutorConfig) -> None:
        """Start the worker's run guardian: runs then die with the worker, SIGKILL included."""
        _base_env.cache_clear()
        start_guardian(grace=config.kill_grace_seconds)

    def on_worker_stop(self) -> None:
        """Close the run guardian (it stops any run left behind) and wait for it."""
        stop_guardian()

    def execute(self, spec: Any, ctx: RunContext) -> Result:
        proc = subprocess.Popen(
            [spec.shell, "-c", spec.command],
            cwd=spec.cwd,
            env=self._env(ctx),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        tail = _Tail()
        try:
            outcome = _Supervisor(proc, ctx, tail).run()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
            proc.wait()
        return self._result(outcome, proc.returncode, tail, ctx)

    def _env(self, ctx: RunContext) -> dict[str, str]:
        env = _base_env().copy()
        env.update(ctx.env)
        env.update(param_env(dict(ctx.parameters)))
        env.update(guard_env())
        env[RUN_MARKER] = str(ctx.run_id)
        return env

    def _result(
        self, outcome: Outcome | None, code: int | None, tail: _Tail, ctx: RunContext
    ) -> Result:
        if outcome is Outcome.TIMED_OUT:
            return Result(
                outcome=outcome, exit_code=code, error=f"timed out after {ctx.timeout_seconds}s"
            )
        if outcome is Outcome.CANCELLED:
            return Result(outcome=outcome, exit_code=code, error="cancelled")
        if code == 0:
            return Result(outcome=Outcome.SUCCEEDED, exit_code=0)
        error = f"exit code {code}" + (f"\n{tail.text()}" if tail.text() else "")
        return Result(outcome=Outcome.FAILED, exit_code=code, error=error)
