"""The guardian process: when its worker goes, so does every process the worker started.

Run as `python -I -S _guardian_main.py TOKEN GRACE` with stdin the read end of a pipe the worker
holds open for its whole life. It blocks on stdin; at EOF (a clean close or the worker's death,
SIGKILL included) it SIGTERMs every process whose environment carries `NBCRON_GUARD=TOKEN`, waits
up to GRACE seconds, SIGKILLs what is left, and exits.

Standard library only, and nothing from this folder: `-I` keeps it off `sys.path`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

MARKER = "NBCRON_GUARD"
_POLL_SECONDS = 0.05
_KILL_ROUNDS = 100  # SIGKILL sweeps until one finds nobody (a forking tree may take a few)


def wait_for_eof() -> None:
    """Block until every copy of the pipe's write end is closed."""
    while os.read(0, 4096):
        pass


def sweep(entry: bytes, sig: int) -> int:
    """Send `sig` (0: just look) to every process carrying `entry`; how many were found."""
    found = 0
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid() and _signal_if_marked(int(name), entry, sig):
            found += 1
    return found


def _signal_if_marked(pid: int, entry: bytes, sig: int) -> bool:
    """Pin the pid with a pidfd before reading its environment, so a reused pid is never hit."""
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:  # an old kernel (or no fd left): plain kill, a tiny pid-reuse window
        pidfd = None
    try:
        if not _carries(pid, entry):
            return False
        if sig:
            _send(pid, pidfd, sig)
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _send(pid: int, pidfd: int | None, sig: int) -> None:
    with contextlib.suppress(OSError):  # it may have exited meanwhile
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(pid, sig)


def _carries(pid: int, entry: bytes) -> bool:
    """The process's environment holds `entry` (a zombie's or another user's reads as empty)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return entry in f.read().split(b"\0")
    except OSError:
        return False


def stop_marked(entry: bytes, grace: float) -> int:
    """SIGTERM the marked processes, wait up to `grace`, then SIGKILL until none is left."""
    count = sweep(entry, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while count and time.monotonic() < deadline and sweep(entry, 0):
        time.sleep(_POLL_SECONDS)
    for _ in range(_KILL_ROUNDS):
        if not sweep(entry, signal.SIGKILL):
            break
        time.sleep(_POLL_SECONDS)
    return count


def main(argv: list[str]) -> int:
    token, grace = argv[1], float(argv[2])
    wait_for_eof()
    count = stop_marked(f"{MARKER}={token}".encode(), grace)
    if count:
        with contextlib.suppress(OSError):  # the worker's stderr may be gone with it
            os.write(2, f"nbcron guardian: worker gone, stopped {count} run process(es)\n".encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
