"""Jupyter kernels for notebook runs, and a warm pool of them per worker process.

Every run gets a fresh kernel that no run has used. The pool only moves the cost of starting it
(process start, imports, the first `kernel_info` round trip) to before the run arrives: it keeps
`size` ready kernels per kernel name and starts a replacement in the background each time one is
taken. Kernels are shut down after one run, never returned.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync

log = logging.getLogger("nbcron.kernels")
# Kernels share no IPython history file: concurrent kernels would contend for its lock.
IPYKERNEL_ARGS = ["--HistoryManager.hist_file=:memory:"]


class KernelUnavailableError(LookupError):
    """The kernel a notebook asks for is not installed on this machine."""


@dataclass
class Kernel:
    """A started kernel that answered `kernel_info`."""

    name: str
    manager: AsyncKernelManager

    @property
    def pid(self) -> int | None:
        process = getattr(self.manager.provisioner, "process", None)
        return getattr(process, "pid", None)

    def alive(self) -> bool:
        try:
            return bool(run_sync(self.manager.is_alive)())
        except Exception:  # a half-dead kernel is simply not alive
            return False

    def interrupt(self) -> None:
        """Ask the kernel to stop the current cell (SIGINT for ipykernel)."""
        with contextlib.suppress(Exception):
            run_sync(self.manager.interrupt_kernel)()

    def kill(self) -> None:
        """SIGKILL the kernel's process group (the run's thread then sees a dead kernel)."""
        with contextlib.suppress(Exception):
            run_sync(self.manager.signal_kernel)(signal.SIGKILL)

    def shutdown(self) -> None:
        """Stop the kernel and free its ports and connection file (idempotent)."""
        with contextlib.suppress(Exception):
            run_sync(self.manager.shutdown_kernel)(now=True)


def kernel_spec(name: str) -> KernelSpec:
    """The installed kernelspec `name` (python3 falls back to this interpreter's ipykernel)."""
    manager = KernelSpecManager()
    try:
        return manager.get_kernel_spec(name)
    except NoSuchKernel:
        available = ", ".join(sorted(manager.find_kernel_specs())) or "none"
        raise KernelUnavailableError(
            f"kernel {name!r} is not installed on this worker (available: {available})"
        ) from None


def start_kernel(
    name: str, *, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 60.0
) -> Kernel:
    """Start kernel `name` in `cwd` and wait until it answers `kernel_info`."""
    kernel_spec(name)
    manager = AsyncKernelManager(kernel_name=name)
    extra = IPYKERNEL_ARGS if manager.ipykernel else []
    kwargs: dict[str, object] = {"cwd": str(cwd), "extra_arguments": list(extra)}
    if env:
        kwargs["env"] = {**os.environ, **env}
    run_sync(manager.start_kernel)(**kwargs)
    kernel = Kernel(name=name, manager=manager)
    try:
        _wait_ready(manager, timeout)
    except BaseException:
        kernel.shutdown()
        raise
    return kernel


def _wait_ready(manager: AsyncKernelManager, timeout: float) -> None:
    # With the manager as parent, liveness is the process itself, not heartbeats (which a
    # kernel still importing on a busy machine can miss, failing a healthy start).
    client = BlockingKernelClient(parent=manager)
    client.load_connection_info(manager.get_connection_info())
    client.start_channels()
    try:
        client.wait_for_ready(timeout=timeout)
    finally:
        client.stop_channels()


class KernelPool:
    """Ready kernels per kernel name, refilled in the background."""

    def __init__(self, *, size: int, cwd: Path, start_timeout: float = 60.0) -> None:
        self.size, self.cwd, self.start_timeout = size, cwd, start_timeout
        self._ready: dict[str, deque[Kernel]] = {}
        self._starting: dict[str, int] = {}
        self._waiting: dict[str, int] = {}
        self._failures: dict[str, int] = {}
        self._lock = threading.Condition()
        self._closed = False

    def warm(self, names: Iterable[str]) -> None:
        """Start filling the pool for these kernel names."""
        for name in names:
            self._refill(name)

    def take(self, name: str) -> Kernel | None:
        """A ready, never-used kernel, or None when the caller should start its own.

        When none is ready but one is being started that no other run waits for, waiting for
        it is quicker than starting another; otherwise the caller starts one at once.
        """
        with self._lock:
            queue = self._ready.setdefault(name, deque())
            if not queue and self._starting.get(name, 0) > self._waiting.get(name, 0):
                self._wait_for_start(name, queue)
            kernel = queue.popleft() if queue else None
        self._refill(name)
        if kernel is not None and not kernel.alive():
            retire(kernel)
            return self.take(name)
        return kernel

    def _wait_for_start(self, name: str, queue: deque[Kernel]) -> None:
        """Wait (lock held) for a kernel already being started to become ready."""
        self._waiting[name] = self._waiting.get(name, 0) + 1
        deadline = time.monotonic() + self.start_timeout
        try:
            while not queue and not self._closed and self._starting.get(name, 0) > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._lock.wait(left)
        finally:
            self._waiting[name] -= 1

    def ready_count(self, name: str) -> int:
        with self._lock:
            return len(self._ready.get(name, ()))

    def wait_ready(self, name: str, count: int, timeout: float) -> bool:
        """Block until `count` kernels of `name` are ready (for tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._ready.get(name, ())) < count:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._lock.wait(left)
        return True

    def close(self) -> None:
        """Shut down every idle kernel; kernels being started are shut down when ready."""
        with self._lock:
            self._closed = True
            idle = [k for queue in self._ready.values() for k in queue]
            self._ready.clear()
            self._lock.notify_all()
        for kernel in idle:
            kernel.shutdown()

    def _refill(self, name: str) -> None:
        with self._lock:
            if self._closed or self._failures.get(name, 0) >= 3:
                return  # a kernel that keeps failing to start is not retried forever
            missing = self.size - len(self._ready.get(name, ())) - self._starting.get(name, 0)
            self._starting[name] = self._starting.get(name, 0) + max(missing, 0)
        for _ in range(max(missing, 0)):
            threading.Thread(
                target=self._start_one, args=(name,), name=f"nbcron-kernel-{name}", daemon=True
            ).start()

    def _start_one(self, name: str) -> None:
        kernel: Kernel | None = None
        try:
            kernel = start_kernel(name, cwd=self.cwd, timeout=self.start_timeout)
        except Exception as exc:
            log.warning("warm kernel %s could not start: %s", name, exc)
        with self._lock:
            self._starting[name] -= 1
            if kernel is None:
                self._failures[name] = self._failures.get(name, 0) + 1
            elif not self._closed:
                self._failures[name] = 0
                self._ready.setdefault(name, deque()).append(kernel)
                kernel = None
            self._lock.notify_all()
        if kernel is not None:  # the pool closed while it was starting
            kernel.shutdown()


_pool: KernelPool | None = None
_pool_lock = threading.Lock()


def start_pool(*, size: int, names: Iterable[str], cwd: Path, start_timeout: float) -> KernelPool:
    """Start this process's pool (replacing an older one)."""
    global _pool
    pool = KernelPool(size=size, cwd=cwd, start_timeout=start_timeout)
    with _pool_lock:
        old, _pool = _pool, pool
    if old is not None:
        old.close()
    pool.warm(names)
    return pool


def active_pool() -> KernelPool | None:
    """This process's pool, if a worker started one."""
    return _pool


def stop_pool() -> None:
    """Shut down this process's pool and its idle kernels."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.close()


def retire(kernel: Kernel) -> None:
    """Shut down a used kernel without making the run wait for it."""
    threading.Thread(target=kernel.shutdown, name="nbcron-kernel-retire", daemon=True).start()


atexit.register(stop_pool)
