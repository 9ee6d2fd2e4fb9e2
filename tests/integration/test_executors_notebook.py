"""Notebook executor end to end: real API, dispatcher, worker, Postgres, Redis and Jupyter kernels.

One stack serves the module; its worker keeps a warm kernel pool (size 1). Test notebooks are
written into the stack's notebooks folder by the fixture; `examples/daily_report.ipynb` is the
contract's example notebook from the repository.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import psutil
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from executors.kernels import KernelPool, retire
from service.errors import ValidationError
from service.store import Store
from service.tasks import check_parameters, executor_config, parse_task_body
from tests.integration.executor_support import artifact, log_text, module_stack, run_task
from tests.support import ROOT, Stack, wait_for, wait_run

ERROR_TAG = "papermill-error-cell-tag"
KERNEL_PID_RE = re.compile(r"kernel python3 \(pid (\d+)\)")


def make_notebook(*sources: str, params: str | None = None) -> dict[str, Any]:
    """A small v4 notebook as JSON, with a `parameters`-tagged cell when given."""
    cells = [new_markdown_cell("test notebook")]
    if params is not None:
        cell = new_code_cell(params)
        cell.metadata["tags"] = ["parameters"]
        cells.append(cell)
    cells += [new_code_cell(source) for source in sources]
    nb = new_notebook(
        cells=cells,
        metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "P"}},
    )
    return dict(json.loads(nbformat.writes(nb)))


FRESH = make_notebook(
    "import os\n"
    'fresh = "_nbcron_marker" not in globals()\n'
    "_nbcron_marker = True\n"
    'print(f"pid={os.getpid()} fresh={fresh}")'
)
FAILS = make_notebook('print("before failure")', "1/0", 'print("never")')
SLOW = make_notebook(
    'print("started", flush=True)',
    "import time\ntime.sleep(seconds)",
    'print("never")',
    params="seconds = 60",
)


def _write(folder: Path, name: str, content: dict[str, Any]) -> None:
    (folder / name).write_text(json.dumps(content))


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("nb-stack") / "notebooks"
    (folder / "examples").mkdir(parents=True)
    shutil.copy(ROOT / "notebooks/examples/daily_report.ipynb", folder / "examples")
    for name, content in {"fresh.ipynb": FRESH, "fails.ipynb": FAILS, "slow.ipynb": SLOW}.items():
        _write(folder, name, content)
    return folder


@pytest.fixture(scope="module")
def stack(template_db: str, notebooks: Path) -> Iterator[Stack]:
    with module_stack(template_db, notebooks.parent, notebooks_dir=notebooks) as running:
        yield running


def output_notebook(api: Any, run_id: int) -> nbformat.NotebookNode:
    response = artifact(api, run_id, "output.ipynb")
    assert response.headers["content-type"].startswith("application/x-ipynb+json")
    return nbformat.reads(response.text, as_version=4)


def code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def stream_text(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def kernel_pid(text: str) -> int:
    match = KERNEL_PID_RE.search(text)
    assert match, text
    return int(match.group(1))


def test_warm_pool_gives_every_run_a_fresh_never_used_kernel(stack: Stack) -> None:
    with stack.client() as api:
        api.post(
            "/api/tasks", json={"name": "fresh", "executor": "notebook", "notebook": "fresh.ipynb"}
        )
        texts = []
        for _ in range(2):
            run = wait_run(api, api.post("/api/tasks/fresh/trigger").json()["id"], timeout=60)
            assert run["status"] == "succeeded", run
            texts.append(log_text(api, run["id"]))
    for text in texts:
        assert "from the warm pool, fresh and never used" in text, text
        assert "fresh=True" in text
    pids = [kernel_pid(t) for t in texts]
    printed = [int(re.search(r"pid=(\d+)", t).group(1)) for t in texts]  # type: ignore[union-attr]
    assert pids[0] != pids[1] and printed == pids
    wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), timeout=15, what="kernels gone")


def test_the_pool_refills_in_the_background_and_shuts_down_what_it_holds(tmp_path: Path) -> None:
    pool = KernelPool(size=1, cwd=tmp_path)
    pool.warm(["python3"])
    assert pool.wait_ready("python3", 1, timeout=60)
    taken = pool.take("python3")
    assert taken is not None and taken.alive() and pool.ready_count("python3") == 0
    assert pool.wait_ready("python3", 1, timeout=60)  # a replacement, started without a run
    spare = pool._ready["python3"][0]
    assert spare.pid != taken.pid and spare.alive()
    retire(taken)
    pool.close()
    assert pool.take("python3") is None
    gone = [taken.pid, spare.pid]
    wait_for(lambda: not any(psutil.pid_exists(p) for p in gone if p), timeout=15, what="exit")


def test_contract_example_runs_with_parameters_progress_and_artifacts(stack: Stack) -> None:
    body = {
        "name": "daily-report",
        "executor": "notebook",
        "notebook": "examples/daily_report.ipynb",
        "parameters": {"days": 7},
        "schedule": "0 7 * * *",
        "timezone": "Europe/Paris",
    }
    with stack.client() as api:
        run = run_task(api, body, parameters={"region": "us"})
        assert run["status"] == "succeeded", run
        text = log_text(api, run["id"])
        assert re.search(r"\[nbcron\] cell \d+ \(1/4\) started", text), text
        assert re.search(r"\[nbcron\] cell \d+ completed in [0-9.]+s", text)
        assert "region=us days=7" in text
        listed = {a["name"]: a for a in api.get(f"/api/runs/{run['id']}/artifacts").json()}
        assert set(listed) == {"output.ipynb", "report.html"}
        assert listed["report.html"]["content_type"] == "text/html"
        assert listed["output.ipynb"]["size"] > 0 and listed["output.ipynb"]["created_at"]
        nb = output_notebook(api, run["id"])
        report = artifact(api, run["id"], "report.html")
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and 'region = "us"' in injected[0].source and "days = 7" in injected[0].source
    assert nb.metadata["nbcron"]["run_id"] == run["id"]
    assert report.headers["content-type"].startswith("text/html")
    assert report.headers["content-security-policy"] == "sandbox"
    assert report.headers["x-content-type-options"] == "nosniff"
    assert "region=us days=7" in report.text and 'class="jp-CodeMirrorEditor' in report.text


def test_hide_code_leaves_code_cells_out_of_the_report(stack: Stack) -> None:
    body = {
        "name": "daily-report-hidden",
        "executor": "notebook",
        "notebook": "examples/daily_report.ipynb",
        "hide_code": True,
    }
    with stack.client() as api:
        run = run_task(api, body)
        assert run["status"] == "succeeded", run
        report = artifact(api, run["id"], "report.html").text
    assert "region=eu days=7" in report
    assert 'class="jp-CodeMirrorEditor' not in report


def test_a_failing_cell_fails_the_run_naming_cell_and_exception(stack: Stack) -> None:
    with stack.client() as api:
        run = run_task(api, {"name": "fails", "executor": "notebook", "notebook": "fails.ipynb"})
        assert run["status"] == "failed", run
        nb = output_notebook(api, run["id"])
        assert artifact(api, run["id"], "report.html").text
    match = re.fullmatch(
        r"cell (\d+) \(In \[2\]\) raised ZeroDivisionError: division by zero", run["error"]
    )
    assert match, run["error"]
    as_run = [c for c in nb.cells if ERROR_TAG not in c.metadata.get("tags", [])]
    failing = as_run[int(match.group(1))]
    assert failing.source == "1/0"
    assert [o.ename for o in failing.outputs if o.output_type == "error"] == ["ZeroDivisionError"]
    before, _, after = code_cells(nb)
    assert stream_text(before) == "before failure\n" and after.outputs == []


def test_a_whole_run_timeout_keeps_the_partial_output(stack: Stack) -> None:
    body = {
        "name": "slow-timeout",
        "executor": "notebook",
        "notebook": "slow.ipynb",
        "timeout_seconds": 3,
    }
    with stack.client() as api:
        run = run_task(api, body)
        assert run["status"] == "timed_out", run
        assert run["error"].startswith("timed out after 3")
        nb = output_notebook(api, run["id"])
    _params, printed, sleeping, never = code_cells(nb)
    assert stream_text(printed) == "started\n"
    assert [o.ename for o in sleeping.outputs if o.output_type == "error"] == ["KeyboardInterrupt"]
    assert never.outputs == []


def test_cancel_stops_the_kernel_and_progress_is_logged_as_it_happens(stack: Stack) -> None:
    with stack.client() as api:
        api.post(
            "/api/tasks", json={"name": "slow", "executor": "notebook", "notebook": "slow.ipynb"}
        )
        run_id = api.post("/api/tasks/slow/trigger").json()["id"]

        def progressed() -> str | None:
            text = log_text(api, run_id)
            return text if "started\n" in text and "(3/4) started" in text else None

        text = wait_for(progressed, timeout=30, what="live progress lines")
        assert api.get(f"/api/runs/{run_id}").json()["status"] == "running"
        assert api.post(f"/api/runs/{run_id}/cancel").status_code == 200
        run = wait_run(api, run_id, timeout=30)
        assert run["status"] == "cancelled", run
        nb = output_notebook(api, run_id)
    assert stream_text(code_cells(nb)[1]) == "started\n"
    pid = kernel_pid(text)
    wait_for(lambda: not psutil.pid_exists(pid), timeout=15, what="the kernel to exit")


def test_a_missing_kernel_fails_the_run_with_a_clear_message(stack: Stack) -> None:
    body = {
        "name": "no-kernel",
        "executor": "notebook",
        "notebook": "fresh.ipynb",
        "kernel": "no-such-kernel",
    }
    with stack.client() as api:
        run = run_task(api, body)
    assert run["status"] == "failed"
    assert "kernel 'no-such-kernel' is not installed on this worker" in run["error"]
    assert "python3" in run["error"]  # lists what is available


def test_an_uploaded_snapshot_runs_without_the_file_and_is_versioned(stack: Stack) -> None:
    first = make_notebook('print(f"snapshot-one n={n}")', params="n = 1")
    second = make_notebook('print(f"snapshot-two n={n * 10}")', params="n = 1")
    body = {
        "name": "snap",
        "executor": "notebook",
        "notebook_content": first,
        "parameters": {"n": 2},
    }
    with stack.client() as api:
        created = api.post("/api/tasks", json=body)
        assert created.status_code == 201, created.text
        assert created.json()["notebook_version"] == 1
        run = wait_run(api, api.post("/api/tasks/snap/trigger").json()["id"], timeout=60)
        assert run["status"] == "succeeded", run
        text = log_text(api, run["id"])
        assert "snapshot v1" in text and "snapshot-one n=2" in text

        patched = api.patch("/api/tasks/snap", json={"notebook_content": second}).json()
        assert patched["notebook_version"] == 2
        sha = patched["notebook_sha256"]
        same = api.patch("/api/tasks/snap", json={"description": "unchanged notebook"}).json()
        assert same["notebook_version"] == 2 and same["notebook_sha256"] == sha

        trigger = {"parameters": {"n": 5}}
        run = wait_run(
            api, api.post("/api/tasks/snap/trigger", json=trigger).json()["id"], timeout=60
        )
        assert run["status"] == "succeeded", run
        text = log_text(api, run["id"])
    assert "snapshot v2" in text and "snapshot-two n=50" in text
    assert not list(stack.settings.notebooks_dir.rglob("*snap*"))


BAD_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("dot-dot", {"notebook": "../outside.ipynb"}, "notebook"),
    ("nested dot-dot", {"notebook": "examples/../../outside.ipynb"}, "notebook"),
    ("absolute", {"notebook": "/etc/daily_report.ipynb"}, "notebook"),
    ("not ipynb", {"notebook": "examples/notes.txt"}, "notebook"),
    ("neither", {}, "notebook"),
    ("both", {"notebook": "fresh.ipynb", "notebook_content": FRESH}, "notebook"),
    ("not a notebook", {"notebook_content": {"cells": "nope"}}, "notebook_content"),
    ("unknown parameter", {"notebook_content": SLOW, "parameters": {"sleep": 1}}, "parameters"),
    ("wrong type", {"notebook_content": SLOW, "parameters": {"seconds": "ten"}}, "parameters"),
    ("bool for int", {"notebook_content": SLOW, "parameters": {"seconds": True}}, "parameters"),
    ("bad kernel name", {"notebook": "fresh.ipynb", "kernel": "no kernel!"}, "kernel"),
    ("unknown field", {"notebook": "fresh.ipynb", "cwd": "/"}, "cwd"),
]


@pytest.mark.parametrize(("label", "fields", "field"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_notebook_tasks_are_422_at_create(
    stack: Stack, label: str, fields: dict[str, Any], field: str
) -> None:
    with stack.client() as api:
        resp = api.post("/api/tasks", json={"name": "bad-nb", "executor": "notebook", **fields})
        assert resp.status_code == 422, resp.text
        assert resp.json()["field"] == field, resp.json()
        assert api.get("/api/tasks/bad-nb").status_code == 404


def test_parameters_are_checked_against_the_notebook_at_create_and_trigger(stack: Stack) -> None:
    """The service checks (service.tasks) with this machine's notebooks folder."""
    config = executor_config(stack.settings)
    base = {
        "name": "params-check",
        "executor": "notebook",
        "notebook": "examples/daily_report.ipynb",
    }
    with pytest.raises(ValidationError) as unknown:
        parse_task_body({**base, "parameters": {"dayz": 3}}, config=config)
    assert unknown.value.status_code == 422 and unknown.value.field == "parameters"
    assert "dayz" in unknown.value.detail and "days" in unknown.value.detail
    with pytest.raises(ValidationError, match="must be float"):
        parse_task_body({**base, "parameters": {"threshold": "high"}}, config=config)
    parse_task_body({**base, "parameters": {"threshold": 1, "days": 3}}, config=config)

    assert stack.settings.database_url
    with stack.client() as api:
        assert api.post("/api/tasks", json=base).status_code == 201
    with Store(stack.settings.database_url, min_size=1, max_size=1) as store:
        task = store.get_task("params-check")
    assert check_parameters({"days": 3, "verbose": True}, task=task, config=config)
    for bad in ({"nope": 1}, {"days": "seven"}, {"verbose": "yes"}):
        with pytest.raises(ValidationError) as err:
            check_parameters(bad, task=task, config=config)
        assert err.value.status_code == 422 and err.value.field == "parameters"


def test_the_api_checks_parameters_against_the_notebook_at_create_and_trigger(
    stack: Stack,
) -> None:
    """Through HTTP: unknown names or unfitting values are 422 before anything runs."""
    base = {"name": "api-params", "executor": "notebook", "notebook": "examples/daily_report.ipynb"}
    with stack.client() as api:
        bad = api.post("/api/tasks", json={**base, "parameters": {"dayz": 3}})
        assert bad.status_code == 422 and bad.json()["field"] == "parameters", bad.text
        assert api.post("/api/tasks", json=base).status_code == 201
        runs_before = api.get("/api/tasks/api-params/runs").json()["items"]
        for params in ({"nope": 1}, {"days": "seven"}):
            resp = api.post("/api/tasks/api-params/trigger", json={"parameters": params})
            assert resp.status_code == 422 and resp.json()["field"] == "parameters", resp.text
        assert api.get("/api/tasks/api-params/runs").json()["items"] == runs_before
        ok = api.post("/api/tasks/api-params/trigger", json={"parameters": {"days": 2}})
        assert ok.status_code == 202, ok.text


def test_a_symlink_escaping_the_notebooks_folder_is_refused(stack: Stack, tmp_path: Path) -> None:
    outside = tmp_path / "outside.ipynb"
    outside.write_text(json.dumps(make_notebook('print("escaped!")')))
    link = stack.settings.notebooks_dir / "escape.ipynb"
    body = {"name": "escape", "executor": "notebook", "notebook": "escape.ipynb"}
    with stack.client() as api:
        # created while a real notebook is there, then swapped for an escaping link: the worker
        # refuses at run time; a task naming the link now is refused at create time
        link.write_text(json.dumps(make_notebook('print("inside")')))
        assert api.post("/api/tasks", json=body).status_code == 201
        link.unlink()
        link.symlink_to(outside)
        try:
            trigger = api.post("/api/tasks/escape/trigger")
            assert trigger.status_code == 422 and trigger.json()["field"] == "notebook"
            # queued behind the API's back (as if swapped in after the trigger): the worker refuses
            assert stack.settings.database_url
            with Store(stack.settings.database_url, min_size=1, max_size=1) as store:
                queued, _ = store.create_run(
                    store.get_task("escape"), trigger="manual", parameters={}
                )
            run = wait_run(api, queued.id, timeout=60)
            refused = api.post("/api/tasks", json={**body, "name": "escape2"})
            assert refused.status_code == 422 and refused.json()["field"] == "notebook"
            with pytest.raises(ValidationError) as err:
                parse_task_body({**body, "name": "escape3"}, config=executor_config(stack.settings))
        finally:
            link.unlink()
        text = log_text(api, run["id"])
    assert run["status"] == "failed"
    assert "resolves outside the notebooks folder" in run["error"]
    assert "escaped!" not in text
    assert err.value.field == "notebook"


def test_artifacts_api_validates_names_and_needs_only_read_access(stack: Stack) -> None:
    with stack.client() as api:
        run = run_task(api, {"name": "art", "executor": "notebook", "notebook": "fresh.ipynb"})
        run_id = run["id"]
        assert api.get(f"/api/runs/{run_id}/artifacts/missing.html").status_code == 404
        assert api.get("/api/runs/999999/artifacts").status_code == 404
        assert api.get("/api/runs/999999/artifacts/output.ipynb").status_code == 404
        bad = api.get(f"/api/runs/{run_id}/artifacts/.hidden")
        assert bad.status_code == 422 and bad.json()["field"] == "name"
        viewer_key = api.post("/api/keys", json={"name": "v", "role": "viewer"}).json()["key"]
    with stack.client(key=viewer_key) as viewer:
        assert {a["name"] for a in viewer.get(f"/api/runs/{run_id}/artifacts").json()} == {
            "output.ipynb",
            "report.html",
        }
        assert viewer.get(f"/api/runs/{run_id}/artifacts/report.html").status_code == 200
    with stack.client(key="") as anonymous:
        assert anonymous.get(f"/api/runs/{run_id}/artifacts").status_code == 401
        assert anonymous.get(f"/api/runs/{run_id}/artifacts/report.html").status_code == 401
