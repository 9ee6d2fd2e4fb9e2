"""Shell executor: a command in its own process group, output streamed, the whole tree killed.

Parameters reach the process as `NBCRON_PARAM_<NAME>` environment variables and are never spliced
into the command text, so a value like `; rm -rf ~` is inert data.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from typing import IO, Annotated, Any

import msgspec
import psutil

from executors import Executor, Outcome, Result, RunContext, SpecError
from executors.procs import die_with_parent

RUN_MARKER = "NBCRON_RUN_ID"
_PARAM_NAME_RE = re.compile(r"[^A-Za-z0-9_]")
_POLL_SECONDS = 0.05
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
    """Keeps the last lines of output for the run's `error` field."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, text: str) -> None:
        self.lines.extend(text.splitlines())
        del self.lines[:-_TAIL_LINES]

    def text(self) -> str:
        return "\n".join(self.lines)


def _pump(stream: IO[bytes], ctx: RunContext, tail: _Tail) -> None:
    """Copy the process output into the run log as it arrives."""
    for chunk in iter(lambda: stream.read1(65536), b""):  # type: ignore[attr-defined]
        text = chunk.decode("utf-8", errors="replace")
        tail.add(text)
        ctx.log(text)


class ShellExecutor(Executor):
    kind = "shell"
    spec_type = ShellSpec

    def validate(self, spec: Any) -> None:
        if "\x00" in spec.command:
            raise SpecError("command must not contain NUL bytes", field="command")

    def execute(self, spec: Any, ctx: RunContext) -> Result:
        env = self._env(ctx)
        proc = subprocess.Popen(
            [spec.shell, "-c", spec.command],
            cwd=spec.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGKILL),  # a killed worker leaves no orphan run
        )
        tail = _Tail()
        pump = threading.Thread(target=_pump, args=(proc.stdout, ctx, tail), daemon=True)
        pump.start()
        outcome = self._wait(proc, ctx)
        self._finish_output(proc, pump, ctx)
        return self._result(outcome, proc.returncode, tail, ctx)

    def _env(self, ctx: RunContext) -> dict[str, str]:
        env = dict(os.environ)
        env.update(ctx.env)
        env.update(param_env(dict(ctx.parameters)))
        env[RUN_MARKER] = str(ctx.run_id)
        return env

    def _wait(self, proc: subprocess.Popen[bytes], ctx: RunContext) -> Outcome | None:
        """Wait for exit; kill the tree on timeout or cancel and say which."""
        deadline = time.monotonic() + ctx.timeout_seconds if ctx.timeout_seconds else None
        while proc.poll() is None:
            if ctx.cancel_event.wait(_POLL_SECONDS):
                kill_tree(proc, ctx.run_id, grace=ctx.config.kill_grace_seconds)
                return Outcome.CANCELLED
            if deadline is not None and time.monotonic() >= deadline:
                kill_tree(proc, ctx.run_id, grace=ctx.config.kill_grace_seconds)
                return Outcome.TIMED_OUT
        return None

    def _finish_output(
        self, proc: subprocess.Popen[bytes], pump: threading.Thread, ctx: RunContext
    ) -> None:
        """Read what is left; a background child holding stdout open is killed, not waited for."""
        pump.join(timeout=2.0)
        if pump.is_alive():
            kill_tree(proc, ctx.run_id, grace=ctx.config.kill_grace_seconds)
            pump.join(timeout=2.0)
        if proc.stdout is not None:
            proc.stdout.close()

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
        error = f"exit code {code}" + (f"\n{tail.text()}" if tail.lines else "")
        return Result(outcome=Outcome.FAILED, exit_code=code, error=error)
