"""Follow the README as a newcomer: clone, `make run`, use the printed key, Ctrl-C, start again."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import ROOT, free_port, wait_run

pytestmark = pytest.mark.slow
INSTALL_AND_START_TIMEOUT = 600


class MakeRun:
    """`make run` in its own process group, as a terminal would run it."""

    def __init__(self, clone: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            ["make", "run"],
            cwd=clone,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_up(self) -> str:
        deadline = time.monotonic() + INSTALL_AND_START_TIMEOUT
        while "Press Ctrl-C to stop." not in self.output:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"make run did not come up:\n{self.output}")
            time.sleep(0.2)
        match = re.search(r"Admin key\s+(\S+)", self.output)
        assert match, self.output
        return Path(match.group(1)).read_text().strip()

    def ctrl_c(self) -> int:
        os.killpg(self.proc.pid, signal.SIGINT)
        code = self.proc.wait(60)
        self._reader.join(5)
        return code


def _leftovers(*markers: Path) -> list[str]:
    """Processes whose command line or working directory is inside the clone or the data dir."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
        except psutil.Error:
            continue
        if any(str(m) in text for m in markers) and proc.pid != os.getpid():
            found.append(f"{proc.pid}: {text}")
    return found


@pytest.fixture
def clone(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "nbcron"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True)
    yield target


def test_make_run_serves_the_example_stops_clean_and_keeps_data(
    clone: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NBCRON_", "VIRTUAL_ENV"))}
    env |= {
        "NBCRON_DATA_DIR": str(data_dir),
        "NBCRON_API_PORT": str(port),
        "NBCRON_DASHBOARD_PORT": str(free_port()),
    }
    base = f"http://127.0.0.1:{port}"

    first = MakeRun(clone, env)
    try:
        key = first.wait_up()
        assert f"API        {base}" in first.output
        assert httpx.get(base + "/health").json() == {"status": "ok"}
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as api:
            body = {"name": "test", "executor": "shell", "command": "echo hello"}
            assert api.post("/api/tasks", json=body).status_code == 201
            run = wait_run(api, api.post("/api/tasks/test/trigger").json()["id"], timeout=60)
            assert run["status"] == "succeeded"
            assert "hello" in api.get(f"/api/runs/{run['id']}/logs").json()["text"]
    finally:
        code = first.ctrl_c()
    assert code in (0, -signal.SIGINT), first.output  # make re-raises the SIGINT it got
    assert "nbcron stopped" in first.output, first.output
    time.sleep(1)
    assert _leftovers(clone, data_dir) == []

    second = MakeRun(clone, env)
    try:
        key = second.wait_up()
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as api:
            task = api.get("/api/tasks/test")
            assert task.status_code == 200 and task.json()["command"] == "echo hello"
            assert len(api.get("/api/tasks/test/runs").json()["items"]) == 1
    finally:
        second.ctrl_c()
    time.sleep(1)
    assert _leftovers(clone, data_dir) == []


def test_a_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("NBCRON_")}
        env |= {"NBCRON_DATA_DIR": str(tmp_path / "data"), "NBCRON_API_PORT": str(port)}
        result = subprocess.run(
            [sys.executable, "-m", "service.cli", "up"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"nbcron: port {port} is already in use (set --port or NBCRON_API_PORT)"
    )
    assert "Traceback" not in result.stdout + result.stderr
