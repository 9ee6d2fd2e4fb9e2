"""The %schedule magic's pure parts: arguments, snapshots, finding the notebook through a Jupyter
server's sessions API (a real loopback HTTP server), and one-line errors in a real IPython shell."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

from service.client import Progress, exit_status, parse_param
from service.magic import (
    ScheduleError,
    _schedule_parser,
    cell_notebook,
    schedule_body,
    server_session_path,
    snapshot,
    task_name_for,
)


def _nb(*cells: dict[str, Any]) -> dict[str, Any]:
    return {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {"widgets": {"x": 1}},
        "cells": list(cells),
    }


def _code(source: str, tags: list[str] | None = None) -> dict[str, Any]:
    meta = {"tags": tags} if tags else {}
    return {
        "cell_type": "code",
        "id": source[:8].replace(" ", "_") or "empty",
        "metadata": meta,
        "execution_count": 3,
        "outputs": [{"output_type": "stream", "name": "stdout", "text": "old"}],
        "source": source,
    }


def test_snapshot_drops_scheduling_lines_skip_cells_and_outputs(tmp_path: Path) -> None:
    path = tmp_path / "nb.ipynb"
    path.write_text(
        json.dumps(
            _nb(
                _code("%load_ext service.magic"),
                _code('x = 1\n%schedule "0 7 * * *"\ny = 2\n'),
                _code("info = %schedule list"),
                _code("%%schedule '@hourly' --name c\nprint(1)"),
                _code("assert info", tags=["nbcron-skip"]),
                {"cell_type": "markdown", "id": "m", "metadata": {}, "source": "# title"},
            )
        )
    )
    nb = snapshot(path)
    assert [c["source"] for c in nb["cells"]] == ["x = 1\ny = 2\n", "# title"]
    assert nb["cells"][0]["outputs"] == [] and nb["cells"][0]["execution_count"] is None
    assert "widgets" not in nb["metadata"]


def test_snapshot_refuses_what_is_not_a_v4_notebook(tmp_path: Path) -> None:
    path = tmp_path / "old.ipynb"
    path.write_text(json.dumps({"nbformat": 3, "worksheets": []}))
    with pytest.raises(ScheduleError, match="not an nbformat 4 notebook"):
        snapshot(path)


def test_cell_notebook_declares_the_parameters_it_is_given() -> None:
    nb = cell_notebook("print(n)", {"n": 4, "who": "x"})
    assert nb["cells"][0]["metadata"] == {"tags": ["parameters"]}
    assert nb["cells"][0]["source"] == "n = 4\nwho = 'x'"
    assert nb["cells"][1]["source"] == "print(n)"
    assert len(cell_notebook("pass", {})["cells"]) == 1


def test_arguments_become_the_fields_that_were_given() -> None:
    args = _schedule_parser().parse_args(["0", "7", "*", "*", "*", "--timezone", "Europe/Paris"])
    assert schedule_body(args, {}) == {"schedule": "0 7 * * *", "timezone": "Europe/Paris"}
    args = _schedule_parser().parse_args(["@daily", "--timeout", "60", "--keep-last", "3"])
    body = schedule_body(args, {"days": 7})
    assert body == {
        "schedule": "@daily",
        "timeout_seconds": 60,
        "keep_last": 3,
        "parameters": {"days": 7},
    }
    with pytest.raises(ScheduleError, match="usage"):
        _schedule_parser().parse_args(["@daily", "--timeout", "soon"])


def test_task_names_come_from_file_names() -> None:
    assert task_name_for(Path("Sales report (v2).ipynb")) == "Sales-report-v2"
    assert task_name_for(Path("2024.ipynb")) == "nb-2024"
    assert task_name_for(Path("---.ipynb")) == "notebook"


def test_params_are_json_when_they_can_be() -> None:
    assert parse_param("days=7") == ("days", 7)
    assert parse_param("region=eu") == ("region", "eu")
    assert parse_param("flags=[1, 2]") == ("flags", [1, 2])
    with pytest.raises(ValueError, match="not k=v"):
        parse_param("days")


def test_progress_follows_notebook_cells_and_exit_status_follows_the_run() -> None:
    progress = Progress(run_id=7)
    progress.update(
        "running", "[nbcron] cell 1 (1/3) started\n[nbcron] cell 2 (2/3) started\n", 1.5
    )
    assert progress.cell == (2, 3) and progress.describe() == "run 7 running · cell 2/3 · 1.5s"
    assert exit_status({"status": "succeeded", "exit_code": 0}) == 0
    assert exit_status({"status": "failed", "exit_code": 3}) == 3
    assert exit_status({"status": "failed", "exit_code": None}) == 1
    assert exit_status({"status": "timed_out", "exit_code": None}) == 124
    assert exit_status({"status": "cancelled", "exit_code": None}) == 1


@pytest.fixture
def jupyter_server(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A loopback HTTP server answering the sessions API, and its runtime file."""
    root = tmp_path / "root"
    (root / "work").mkdir(parents=True)
    notebook = root / "work" / "analysis.ipynb"
    notebook.write_text("{}")
    sessions = [
        {"kernel": {"id": "other"}, "path": "nope.ipynb"},
        {"kernel": {"id": "k-123"}, "path": "work/analysis.ipynb"},
    ]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/api/sessions" and self.headers["Authorization"] == "token s3cret"
            body = json.dumps(sessions if ok else {"message": "Forbidden"}).encode()
            self.send_response(200 if ok else 403)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    info = {"url": f"http://127.0.0.1:{server.server_address[1]}/", "token": "s3cret"}
    (runtime / "jpserver-1.json").write_text(json.dumps(info | {"root_dir": str(root)}))
    (runtime / "jpserver-2.json").write_text("not json")
    yield runtime, notebook
    server.shutdown()


def test_the_sessions_api_names_the_notebook_of_this_kernel(
    jupyter_server: tuple[Path, Path],
) -> None:
    runtime, notebook = jupyter_server
    assert server_session_path(runtime, kernel_id="k-123") == notebook
    assert server_session_path(runtime, kernel_id="unknown") is None


def test_errors_are_one_line_in_a_real_ipython_shell(capsys: pytest.CaptureFixture[str]) -> None:
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "service.magic")
    shell.run_cell("%schedule")
    shell.run_cell('%schedule "0 7 * * *" --notebook /no/such.ipynb')
    shell.run_cell("%schedule logs latest")
    out = capsys.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if ln.strip()]
    assert len(lines) == 3 and all(ln.startswith("nbcron: ") for ln in lines), lines
    assert "usage: %schedule" in lines[0]
    assert "/no/such.ipynb: no such file" in lines[1]
    assert "takes a run id" in lines[2]
