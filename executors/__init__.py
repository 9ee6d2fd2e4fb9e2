"""Executors: the `Executor` base class, the run context and result, and the registry.

Executors never touch the database. The worker hands them a spec (a msgspec Struct of the
executor's own fields) and a `RunContext` (timeout, cancel event, log and artifact sinks), and
records the `Result` they return.
"""

from __future__ import annotations

import logging
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import msgspec

ENTRY_POINT_GROUP = "nbcron.executors"
log = logging.getLogger("nbcron.executors")


class SpecError(ValueError):
    """A task's executor fields do not fit; `field` names the offending one."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnknownExecutorError(LookupError):
    """No executor is registered under that kind."""


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"  # the work did what it should
    FAILED = "failed"  # non-zero exit, bad status, exception
    TIMED_OUT = "timed_out"  # the run hit its time limit
    CANCELLED = "cancelled"  # the cancel event was set


@dataclass(frozen=True, kw_only=True)
class Result:
    """What an executor reports back to the worker."""

    outcome: Outcome
    exit_code: int | None = None
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class ExecutorConfig:
    """Machine-level settings an executor may need (passed in by the worker)."""

    notebooks_dir: Path = Path("notebooks")
    http_allowlist: tuple[str, ...] = ()
    kill_grace_seconds: float = 3.0
    http_max_response_bytes: int = 1024 * 1024  # body kept in the log and response.json
    kernel_pool_size: int = 1  # warm, never-used kernels kept per kernel name (0: no pool)
    kernel_pool_kernels: tuple[str, ...] = ("python3",)  # kernel names warmed at worker start
    kernel_start_timeout: float = 60.0


def _discard_log(text: str) -> None:
    return None


def _discard_artifact(name: str, content_type: str, data: bytes) -> None:
    return None


@dataclass(kw_only=True)
class RunContext:
    """Everything an executor gets about the run besides its spec."""

    run_id: int
    task_name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    timeout_seconds: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    log: Callable[[str], None] = _discard_log
    add_artifact: Callable[[str, str, bytes], None] = _discard_artifact
    config: ExecutorConfig = field(default_factory=ExecutorConfig)


class Executor(ABC):
    """Owns the lifecycle of one kind of work; subclasses implement `execute`."""

    kind: ClassVar[str]
    spec_type: ClassVar[type[msgspec.Struct]]

    def parse_spec(
        self, fields: Mapping[str, Any], *, config: ExecutorConfig | None = None
    ) -> msgspec.Struct:
        """Turn the task's executor fields into `spec_type`, naming the field on error.

        With `config` (the machine's settings) the executor may also check what only that
        machine can see, such as a notebook under its notebooks folder.
        """
        try:
            spec = msgspec.convert(dict(fields), self.spec_type, strict=True)
        except msgspec.ValidationError as exc:
            raise SpecError(str(exc).replace("$.", ""), field=_field_of(exc)) from exc
        self.validate(spec)
        if config is not None:
            self.validate_on_machine(spec, config)
        return spec

    def validate(self, spec: Any) -> None:
        """Checks beyond types; raise SpecError naming the field. Default: none."""
        return None

    def validate_on_machine(self, spec: Any, config: ExecutorConfig) -> None:
        """Checks against this machine's settings and files. Default: none."""
        return None

    def check_parameters(
        self, spec: Any, parameters: Mapping[str, Any], *, config: ExecutorConfig | None = None
    ) -> None:
        """Trigger-time check of run parameters; raise SpecError. Default: anything goes."""
        return None

    def on_worker_start(self, config: ExecutorConfig) -> None:
        """Called once when a worker process starts (e.g. to warm kernels). Default: nothing."""
        return None

    def on_worker_stop(self) -> None:
        """Called once when a worker process stops. Default: nothing."""
        return None

    def run(self, spec: Any, ctx: RunContext) -> Result:
        """Execute with the lifecycle guarantees: an exception becomes a failed result."""
        if ctx.cancel_event.is_set():
            return Result(outcome=Outcome.CANCELLED, error="cancelled before start")
        try:
            return self.execute(spec, ctx)
        except Exception as exc:  # an executor bug must still end the run
            ctx.log(f"\n[nbcron] executor error: {type(exc).__name__}: {exc}\n")
            return Result(outcome=Outcome.FAILED, error=f"{type(exc).__name__}: {exc}")

    @abstractmethod
    def execute(self, spec: Any, ctx: RunContext) -> Result:
        """Do the work; honour ctx.timeout_seconds and ctx.cancel_event."""


_FIELD_RES = (
    re.compile(r"(?:unknown|missing required) field `([^`]+)`"),
    re.compile(r"`\$\.([^`\[]+)"),
)


def _field_of(exc: msgspec.ValidationError) -> str | None:
    """The field a msgspec message names: an unknown/missing field, else the `$.path`."""
    for pattern in _FIELD_RES:
        match = pattern.search(str(exc))
        if match:
            return match.group(1)
    return None


_registry: dict[str, Executor] = {}
_lock = threading.Lock()
_loaded = False


def register(executor_cls: type[Executor]) -> None:
    """Register an executor class under its `kind` (used by tests and plugins)."""
    _registry[executor_cls.kind] = executor_cls()


def _load_entry_points() -> None:
    global _loaded
    # built-ins work even when the project is not installed
    from executors.http import HttpExecutor
    from executors.notebook import NotebookExecutor
    from executors.shell import ShellExecutor

    for builtin in (ShellExecutor, HttpExecutor, NotebookExecutor):
        _registry.setdefault(builtin.kind, builtin())
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _registry:
            cls = ep.load()
            _registry[ep.name] = cls()
    _loaded = True


def _ensure_loaded() -> None:
    with _lock:
        if not _loaded:
            _load_entry_points()


def start_executors(config: ExecutorConfig) -> None:
    """A worker process starts: let every executor warm up (the notebook kernel pool)."""
    _ensure_loaded()
    for executor in list(_registry.values()):
        try:
            executor.on_worker_start(config)
        except Exception:  # one executor's warm-up must not keep the worker from starting
            log.exception("executor %s failed to start", executor.kind)


def stop_executors() -> None:
    """A worker process stops: let every executor release what it holds."""
    for executor in list(_registry.values()):
        try:
            executor.on_worker_stop()
        except Exception:
            log.exception("executor %s failed to stop", executor.kind)


def get_executor(kind: str) -> Executor:
    """The executor registered as `kind`, or UnknownExecutorError listing the known kinds."""
    _ensure_loaded()
    try:
        return _registry[kind]
    except KeyError:
        known = ", ".join(sorted(_registry))
        raise UnknownExecutorError(f"unknown executor {kind!r} (known: {known})") from None


def known_kinds() -> list[str]:
    """The registered executor kinds."""
    _ensure_loaded()
    return sorted(_registry)
