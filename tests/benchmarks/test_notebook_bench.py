"""Notebook overhead: a trivial parameterised notebook through nbcron (trigger -> succeeded,
output notebook and HTML report stored) next to plain `papermill.execute_notebook`."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import papermill
import psycopg
import pytest

from service.config import Settings
from tests.benchmarks.bench_support import median, running_stack
from tests.benchmarks.conftest import Recorder
from tests.support import Stack

pytestmark = pytest.mark.bench
RUNS = int(os.environ.get("NBCRON_BENCH_NOTEBOOK_RUNS", "10"))


def _notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("n = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("print(n * 2)")]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)


@pytest.fixture
def notebook_stack(settings: Settings, admin_key: str, tmp_path: Path) -> Iterator[Stack]:
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder / "trivial.ipynb")
    local = settings.with_overrides(notebooks_dir=folder, kernel_pool_size=1)
    with running_stack(local, admin_key, tmp_path, workers=1) as stack:
        yield stack


def _through_nbcron(stack: Stack) -> list[float]:
    api = stack.client()
    body = {"name": "trivial", "executor": "notebook", "notebook": "trivial.ipynb"}
    assert api.post("/api/tasks", json=body).status_code == 201
    times = []
    with psycopg.connect(stack.settings.database_url or "", autocommit=True) as conn:
        for i in range(RUNS + 1):
            time.sleep(1.0)  # let the pool refill, as between real runs
            start = time.perf_counter()
            run = api.post("/api/tasks/trivial/trigger", json={"parameters": {"n": i}}).json()
            while True:
                row = conn.execute("SELECT status FROM runs WHERE id = %s", (run["id"],)).fetchone()
                assert row is not None
                if row[0] not in ("queued", "running"):
                    break
                time.sleep(0.005)
            assert row[0] == "succeeded", row
            times.append(time.perf_counter() - start)
    return times[1:]  # the first run warms the API and worker imports


def _plain_papermill(folder: Path, out: Path) -> list[float]:
    times = []
    for i in range(max(3, RUNS // 2)):
        start = time.perf_counter()
        papermill.execute_notebook(
            str(folder / "trivial.ipynb"), str(out), parameters={"n": i}, progress_bar=False
        )
        times.append(time.perf_counter() - start)
    return times


def test_notebook_overhead_against_plain_papermill(
    notebook_stack: Stack, tmp_path: Path, record: Recorder
) -> None:
    ours = _through_nbcron(notebook_stack)
    plain = _plain_papermill(notebook_stack.settings.notebooks_dir, tmp_path / "out.ipynb")
    record.add(
        "trivial notebook, trigger -> succeeded (median)",
        median(ours) * 1000,
        "ms",
        baseline_name="papermill.execute_notebook",
        baseline=median(plain) * 1000,
        target="ratio <= 0.4",
    )
