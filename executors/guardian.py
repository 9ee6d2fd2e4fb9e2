"""The run guardian: one watchdog process per worker that stops the worker's runs when it dies.

The worker starts `_guardian_main.py` with the read end of a pipe as its stdin and keeps the only
write end. However the worker ends (a clean stop, a crash, SIGKILL) the kernel closes that end; the
guardian reads EOF and kills every process whose environment carries `NBCRON_GUARD=<token>`. Runs
get the variable from `guard_env()`, and every descendant inherits it, including one that left the
process group with `setsid`. One process per worker instead of a `setpriv --pdeathsig` wrapper per
run, which halved spawn throughput and covered only the direct child.

If the guardian dies while the worker lives, the next `guard_env()` notices, logs a warning and
starts a new one with a new token. Runs started before that keep the old token and are no longer
guarded (they are still killed on timeout, cancel and `replace` by the executor itself).

A child that `os.fork()`s without exec would inherit the write end and keep the guardian waiting
until it exits; `register_at_fork` closes that copy. Exec'd children never get it (CLOEXEC).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path

GUARD_MARKER = "NBCRON_GUARD"  # its value: the token of the worker's current guardian
SCRIPT = Path(__file__).with_name("_guardian_main.py")
_STOP_MARGIN_SECONDS = 5.0  # beyond the kill grace, for the guardian's own sweeps

log = logging.getLogger("nbcron.executors.guardian")


class Guardian:
    """A guardian process and the pipe that keeps it waiting; replaced if it dies."""

    def __init__(self, *, grace: float) -> None:
        self.grace = grace
        self._lock = threading.Lock()
        self._closed = False
        self.token, self.proc = self._spawn()

    def _spawn(self) -> tuple[str, subprocess.Popen[bytes]]:
        token = secrets.token_hex(16)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(SCRIPT), token, str(float(self.grace))],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # signals to the worker's process group must not reach it
        )
        return token, proc

    def alive(self) -> bool:
        """The guardian process is running (a cheap non-blocking waitpid)."""
        return self.proc.poll() is None

    def env(self) -> dict[str, str]:
        """The variable a run must carry; a dead guardian is replaced first. Closed: {}."""
        if not self.alive():
            self._replace()
        return {} if self._closed else {GUARD_MARKER: self.token}

    def _replace(self) -> None:
        with self._lock:
            if self._closed or self.alive():  # stopped, or another thread replaced it already
                return
            log.warning(
                "run guardian (pid %d) exited with %s; starting a new one (runs already started"
                " are no longer guarded)",
                self.proc.pid,
                self.proc.returncode,
            )
            self._close_pipe()
            self.token, self.proc = self._spawn()

    def close(self, timeout: float | None = None) -> int | None:
        """Close the pipe (the guardian stops any leftover run) and wait; its exit code or None."""
        with self._lock:
            self._closed = True
            self._close_pipe()
        wait = self.grace + _STOP_MARGIN_SECONDS if timeout is None else timeout
        try:
            return self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            log.warning("run guardian (pid %d) still busy after %.0f s", self.proc.pid, wait)
            return None

    def _close_pipe(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


_current: Guardian | None = None
_current_lock = threading.Lock()


def start_guardian(*, grace: float) -> Guardian | None:
    """Start this process's guardian, or return the running one; None (and a warning) off Linux."""
    global _current
    with _current_lock:
        if _current is None:
            if not sys.platform.startswith("linux"):
                log.warning("no run guardian on %s: runs may outlive a killed worker", sys.platform)
                return None
            _current = Guardian(grace=grace)
        return _current


def stop_guardian() -> None:
    """Close this process's guardian, if any, and wait for it to finish."""
    global _current
    with _current_lock:
        guardian, _current = _current, None
    if guardian is not None:
        guardian.close()


def current_guardian() -> Guardian | None:
    """This process's guardian, if one was started."""
    return _current


def guard_env() -> dict[str, str]:
    """`{"NBCRON_GUARD": token}` for a run of this worker, `{}` when no guardian runs."""
    guardian = _current
    if guardian is None:
        return {}
    try:
        return guardian.env()
    except OSError:  # could not replace a dead guardian: run unguarded rather than not at all
        log.exception("could not start a new run guardian")
        return {}


def _forget_in_forked_child() -> None:
    """A forked child must not hold the pipe open, nor think the guardian is its own."""
    global _current
    guardian, _current = _current, None
    if guardian is not None:
        guardian._close_pipe()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_in_forked_child)
