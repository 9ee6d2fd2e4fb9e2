"""A third-party executor, found through the `nbcron.executors` entry point, runs end to end.

The plugin in tests/fixtures/plugin is a real package. Its build backend (setuptools) writes its
metadata, `entry_points.txt` included, from its pyproject.toml into a copy outside the
repository, the way an editable install does; API and worker get that folder on PYTHONPATH and
discover the executor like any installed plugin, through importlib.metadata. (pip needs the
`wheel` package to build with this setuptools, which the venv does not have; the metadata and
the discovery path are the same.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.executor_support import artifact, log_text, module_stack, run_task
from tests.support import ROOT, Stack

PLUGIN_SOURCE = ROOT / "tests/fixtures/plugin"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the plugin with the metadata its build backend generates."""
    source = tmp_path_factory.mktemp("plugin") / "src"
    shutil.copytree(PLUGIN_SOURCE, source)  # the build writes files; keep them out of git
    subprocess.run(
        [sys.executable, "-c", "import setuptools; setuptools.setup()", "egg_info"],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=120,
    )
    entry_points = (source / "nbcron_echo_plugin.egg-info/entry_points.txt").read_text()
    assert "[nbcron.executors]" in entry_points
    assert "echo = nbcron_echo_plugin:EchoExecutor" in entry_points
    return source


@pytest.fixture(scope="module")
def stack(
    template_db: str, plugin_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("plugin-stack")
    env = {"PYTHONPATH": str(plugin_path)}
    with module_stack(template_db, folder, env=env, kernel_pool_size=0) as running:
        yield running


def test_a_plugin_executor_runs_end_to_end(stack: Stack) -> None:
    body = {"name": "greet", "executor": "echo", "message": "hello", "times": 2}
    with stack.client() as api:
        run = run_task(api, body, parameters={"who": "nbcron"})
        assert run["status"] == "succeeded", run
        assert log_text(api, run["id"]).count("hello, nbcron!") == 2
        echoed = artifact(api, run["id"], "echo.txt")
    assert echoed.headers["content-type"].startswith("text/plain")
    assert echoed.text == "hello, nbcron!\nhello, nbcron!"


def test_a_plugin_validates_its_own_fields_and_unknown_kinds_are_422(stack: Stack) -> None:
    with stack.client() as api:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"message": "hi", "times": 0}, "times"),
            ({"message": " padded "}, "message"),
            ({"times": 1}, "message"),
        ]
        for fields, field in cases:
            resp = api.post("/api/tasks", json={"name": "bad", "executor": "echo", **fields})
            assert resp.status_code == 422, resp.text
            assert resp.json()["field"] == field
        unknown = api.post("/api/tasks", json={"name": "bad", "executor": "teleport"})
        assert unknown.status_code == 422 and unknown.json()["field"] == "executor"
        known = unknown.json()["detail"]
    for kind in ("echo", "http", "notebook", "shell"):
        assert kind in known
