"""The %schedule magic end to end: real notebooks executed by nbclient in real IPython kernels,
talking to a real API, dispatcher and worker (Postgres, Redis, papermill) — no mocks.

There is no Jupyter server here, so notebooks name themselves with `--notebook`, or are found
through JPY_SESSION_NAME (what Jupyter sets for a kernel it starts). Cells tagged `nbcron-skip`
hold the test's own checks: the magic leaves them out of the snapshot it uploads.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

from service.jupyter import STARTUP_NAME
from tests.integration.executor_support import module_stack
from tests.support import ROOT, Stack, free_port

SKIP = ["nbcron-skip"]
RAISES = ["raises-exception"]  # nbclient records the error and goes on


def cell(source: str, *, tags: list[str] | None = None) -> nbformat.NotebookNode:
    made = new_code_cell(source)
    if tags:
        made.metadata["tags"] = tags
    return made


def write_notebook(path: Path, cells: list[nbformat.NotebookNode]) -> Path:
    meta = {"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}}
    nbformat.write(new_notebook(cells=cells, metadata=meta), path)
    return path


def execute(path: Path, env: dict[str, str]) -> nbformat.NotebookNode:
    """Run the notebook file in a fresh kernel started with `env`; return it with its outputs."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute(env=env)
    return nb


def outputs(nb: nbformat.NotebookNode, index: int) -> list[dict[str, Any]]:
    return list(nb.cells[index].get("outputs", []))


def html_of(nb: nbformat.NotebookNode, index: int) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in outputs(nb, index))


def stdout_of(nb: nbformat.NotebookNode, index: int) -> str:
    return "".join(o.get("text", "") for o in outputs(nb, index) if o["output_type"] == "stream")


def error_line(nb: nbformat.NotebookNode, index: int) -> str:
    """The cell's error, which the magic must render as exactly one line."""
    errors = [o for o in outputs(nb, index) if o["output_type"] == "error"]
    assert len(errors) == 1, outputs(nb, index)
    lines = errors[0]["traceback"]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "Traceback" not in lines[0]
    return str(lines[0])


def no_errors(nb: nbformat.NotebookNode, *, but: tuple[int, ...] = ()) -> None:
    for index, c in enumerate(nb.cells):
        if index in but:
            continue
        errors = [o for o in c.get("outputs", []) if o["output_type"] == "error"]
        assert not errors, (index, c.source, errors)


@pytest.fixture(scope="module")
def stack(template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("magic-stack")
    with module_stack(template_db, folder, notebooks_dir=ROOT / "notebooks") as running:
        yield running


def test_a_notebook_schedules_itself_triggers_a_run_and_sees_it_succeed(
    stack: Stack, tmp_path: Path
) -> None:
    path = tmp_path / "Self scheduling.ipynb"
    write_notebook(
        path,
        [
            cell("%load_ext service.magic"),
            cell('greeting = "hello"', tags=["parameters"]),
            cell('print(f"{greeting} from the scheduled notebook")'),
            # 3: the user's line: schedule this very notebook
            cell(
                f'%schedule "*/15 * * * *" --notebook "{path}" --param greeting=bonjour'
                " --timezone Europe/Paris --timeout 120 --retries 1"
            ),
            cell("info = _\nassert info.task['notebook_version'] == 1, info.task", tags=SKIP),
            cell("%schedule run Self-scheduling --wait"),  # 5
            cell("result = _\nassert result.status == 'succeeded', result.run", tags=SKIP),
            cell("%schedule runs Self-scheduling"),  # 7
            cell("%schedule list"),  # 8
            cell("%schedule logs {result.id}"),  # 9
            # 10: the notebook changes and is scheduled again: same task, next snapshot version
            cell(
                "import nbformat\n"
                f"edited = nbformat.read({str(path)!r}, 4)\n"
                "edited.cells.append(nbformat.v4.new_markdown_cell('edited'))\n"
                f"nbformat.write(edited, {str(path)!r})",
                tags=SKIP,
            ),
            cell(f'%schedule "0 7 * * *" --name Self-scheduling --notebook "{path}"'),  # 11
            cell(
                "again = _\n"
                "assert again.action == 'updated' and again.task['id'] == info.task['id']",
                tags=SKIP,
            ),
            cell(f'%schedule "61 * * * *" --name bad --notebook "{path}"', tags=RAISES),  # 13
            cell("%schedule run no-such-task", tags=RAISES),  # 14
            cell("%schedule pause Self-scheduling"),  # 15
        ],
    )
    nb = execute(path, stack.env())
    no_errors(nb, but=(13, 14))

    summary = html_of(nb, 3)
    assert "created task Self-scheduling" in summary and "snapshot v1" in summary
    assert summary.count("CET") + summary.count("CEST") == 3  # next three fire times, in Paris
    assert f"{stack.base}/api/tasks/" in summary and "/report" in summary

    run_html = html_of(nb, 5)
    assert "succeeded" in run_html and "/artifacts/report.html" in run_html
    assert "latest report (stable link)" in run_html
    assert "succeeded" in html_of(nb, 7) and "<table" in html_of(nb, 7)  # a Polars table
    assert "Self-scheduling" in html_of(nb, 8)
    assert "bonjour from the scheduled notebook" in stdout_of(nb, 9)  # --param reached the run

    assert "updated task Self-scheduling" in html_of(nb, 11) and "snapshot v2" in html_of(nb, 11)
    assert "invalid minute field '61'" in error_line(nb, 13)
    assert "no-such-task" in error_line(nb, 14) and "not found" in error_line(nb, 14)
    assert "task Self-scheduling paused" in stdout_of(nb, 15)

    with stack.client() as api:
        task = api.get("/api/tasks/Self-scheduling").json()
        assert task["notebook_version"] == 2 and task["schedule"] == "0 7 * * *"
        assert task["parameters"] == {"greeting": "bonjour"}  # options left out keep their values
        assert (task["timezone"], task["timeout_seconds"], task["max_retries"]) == (
            "Europe/Paris",
            120,
            1,
        )
        assert task["enabled"] is False
        sources = "\n".join("".join(c["source"]) for c in task["notebook_content"]["cells"])
        assert "%schedule" not in sources and "load_ext" not in sources  # runs cannot re-schedule
        assert "assert" not in sources  # nbcron-skip cells stay out
        assert "edited" in sources  # the second snapshot is the edited notebook
        assert all(not c.get("outputs") for c in task["notebook_content"]["cells"])
        report = api.get(f"/api/tasks/{task['id']}/report")
        assert report.status_code == 200 and "bonjour from the scheduled notebook" in report.text


def test_cell_magic_schedules_the_cell_and_jupyter_session_names_the_notebook(
    stack: Stack, tmp_path: Path
) -> None:
    other = write_notebook(tmp_path / "found-by-session.ipynb", [cell("print('from the file')")])
    path = write_notebook(
        tmp_path / "cells.ipynb",
        [
            cell("%load_ext service.magic"),
            cell(
                '%%schedule "*/5 * * * *" --name cell-task --param n=4\n'
                "total = sum(range(n))\n"
                "print('cell total', total)"
            ),
            cell("%schedule run cell-task --wait --param n=5"),  # 2
            cell("%schedule logs {_.id}"),  # 3
            cell("%schedule rm cell-task"),  # 4
            cell('%schedule "@daily"'),  # 5: no --notebook, no --name: Jupyter's session says
            cell("%%schedule '@hourly'\nprint(1)", tags=RAISES),  # 6: a cell needs --name
        ],
    )
    nb = execute(path, stack.env(JPY_SESSION_NAME=str(other)))
    no_errors(nb, but=(6,))

    assert "created task cell-task" in html_of(nb, 1) and "of the cell" in html_of(nb, 1)
    assert "succeeded" in html_of(nb, 2)
    assert "cell total 10" in stdout_of(nb, 3)  # the trigger's n=5 won over the default n=4
    assert "task cell-task deleted" in stdout_of(nb, 4)
    assert "created task found-by-session" in html_of(nb, 5)
    assert "needs --name" in error_line(nb, 6)
    with stack.client() as api:
        assert api.get("/api/tasks/cell-task").status_code == 404
        task = api.get("/api/tasks/found-by-session").json()
        assert task["schedule"] == "@daily"
        cells = task["notebook_content"]["cells"]
        assert ["".join(c["source"]) for c in cells] == ["print('from the file')"]


def test_an_unreachable_server_is_one_line_saying_how_to_start_it(
    stack: Stack, tmp_path: Path
) -> None:
    path = write_notebook(
        tmp_path / "offline.ipynb",
        [
            cell("%load_ext service.magic"),
            cell("%schedule list", tags=RAISES),
            cell('%schedule "0 7 * * *" --notebook offline.ipynb', tags=RAISES),
            cell("%schedule", tags=RAISES),
        ],
    )
    closed = f"http://127.0.0.1:{free_port()}"
    nb = execute(path, stack.env(NBCRON_API_URL=closed))
    for index in (1, 2):
        line = error_line(nb, index)
        assert line.startswith(f"nbcron: cannot reach the nbcron API at {closed}"), line
        assert "start it with `make run` or `nbcron up`" in line
    assert error_line(nb, 3).startswith("nbcron: usage: %schedule")


def test_jupyter_enable_loads_the_magic_in_every_new_kernel(stack: Stack, tmp_path: Path) -> None:
    ipython_dir = tmp_path / "ipython"
    env = stack.env(IPYTHONDIR=str(ipython_dir))
    cli = [sys.executable, "-m", "service.cli", "jupyter"]
    done = subprocess.run([*cli, "enable"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    startup = ipython_dir / "profile_default" / "startup" / STARTUP_NAME
    assert str(startup) in done.stdout and startup.is_file()

    path = write_notebook(tmp_path / "plain.ipynb", [cell("%schedule list")])  # no %load_ext
    nb = execute(path, env)
    no_errors(nb)
    assert "<table" in html_of(nb, 0)

    done = subprocess.run([*cli, "disable"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and not startup.exists()
