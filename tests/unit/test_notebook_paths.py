"""Notebook units on a real temporary file system: path containment, parameters, versions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from executors import ExecutorConfig, SpecError, get_executor
from executors.notebook import (
    NotebookSpec,
    check_against_notebook,
    declared_parameters,
    stamp_version,
)
from executors.paths import check_relative, resolve_notebook
from service.errors import ValidationError
from service.tasks import parse_task_body


def notebook(params: str | None = None, *sources: str) -> nbformat.NotebookNode:
    cells = []
    if params is not None:
        cell = new_code_cell(params)
        cell.metadata["tags"] = ["parameters"]
        cells.append(cell)
    cells += [new_code_cell(s) for s in sources]
    meta = {"kernelspec": {"name": "python3", "language": "python", "display_name": "P"}}
    return new_notebook(cells=cells, metadata=meta)


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """root/notebooks with a notebook, a sibling root/notebooks-evil, and an outside file."""
    root = tmp_path / "notebooks"
    (root / "sub").mkdir(parents=True)
    nbformat.write(notebook("x = 1"), root / "ok.ipynb")
    nbformat.write(notebook(), root / "sub" / "deep.ipynb")
    evil = tmp_path / "notebooks-evil"
    evil.mkdir()
    nbformat.write(notebook(), evil / "evil.ipynb")
    nbformat.write(notebook(), tmp_path / "outside.ipynb")
    return root


# -- paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "",
        "../outside.ipynb",
        "sub/../../outside.ipynb",
        "../notebooks-evil/evil.ipynb",
        "/etc/passwd.ipynb",
        "~/x.ipynb",
        "sub\\..\\..\\outside.ipynb",
        "a\x00.ipynb",
        "notes.txt",
        "x" * 2000 + ".ipynb",
    ],
)
def test_lexically_bad_paths_are_refused_without_a_file_system(path: str) -> None:
    with pytest.raises(SpecError) as err:
        check_relative(path)
    assert err.value.field == "notebook"


def test_a_notebook_inside_the_root_resolves(layout: Path) -> None:
    assert resolve_notebook(layout, "ok.ipynb") == (layout / "ok.ipynb").resolve()
    assert resolve_notebook(layout, "./sub/deep.ipynb") == (layout / "sub/deep.ipynb").resolve()
    (layout / "alias.ipynb").symlink_to(layout / "sub" / "deep.ipynb")
    assert resolve_notebook(layout, "alias.ipynb") == (layout / "sub/deep.ipynb").resolve()


def test_symlink_escapes_are_refused(layout: Path) -> None:
    (layout / "link.ipynb").symlink_to(layout.parent / "outside.ipynb")
    (layout / "linkdir").symlink_to(layout.parent)
    for path in ("link.ipynb", "linkdir/outside.ipynb"):
        with pytest.raises(SpecError, match="outside the notebooks folder") as err:
            resolve_notebook(layout, path)
        assert err.value.field == "notebook"


def test_a_sibling_folder_sharing_the_prefix_is_outside(layout: Path) -> None:
    """/x/notebooks-evil starts with the string /x/notebooks but is not inside it."""
    (layout / "evil.ipynb").symlink_to(layout.parent / "notebooks-evil" / "evil.ipynb")
    with pytest.raises(SpecError, match="outside the notebooks folder"):
        resolve_notebook(layout, "evil.ipynb")


def test_a_root_reached_through_a_symlink_still_contains_its_files(layout: Path) -> None:
    alias = layout.parent / "alias-root"
    alias.symlink_to(layout)
    assert resolve_notebook(alias, "ok.ipynb") == (layout / "ok.ipynb").resolve()


def test_missing_files_folders_and_roots_are_spec_errors(layout: Path) -> None:
    with pytest.raises(SpecError, match="not found"):
        resolve_notebook(layout, "missing.ipynb")
    (layout / "dir.ipynb").mkdir()
    with pytest.raises(SpecError, match="not a file"):
        resolve_notebook(layout, "dir.ipynb")
    with pytest.raises(SpecError, match="does not exist"):
        resolve_notebook(layout / "nope", "ok.ipynb")
    loop = layout / "loop.ipynb"
    loop.symlink_to(loop)
    with pytest.raises(SpecError):
        resolve_notebook(layout, "loop.ipynb")


def test_create_with_this_machines_folder_is_422_naming_the_notebook(layout: Path) -> None:
    """The same check the API makes when it knows its notebooks folder (service.tasks)."""
    (layout / "link.ipynb").symlink_to(layout.parent / "outside.ipynb")
    config = ExecutorConfig(notebooks_dir=layout)
    for path in ("link.ipynb", "missing.ipynb", "../outside.ipynb"):
        body: dict[str, Any] = {"name": "t", "executor": "notebook", "notebook": path}
        with pytest.raises(ValidationError) as err:
            parse_task_body(body, config=config)
        assert err.value.status_code == 422 and err.value.field == "notebook"
    body = {"name": "t", "executor": "notebook", "notebook": "ok.ipynb", "parameters": {"x": 2}}
    assert parse_task_body(body, config=config)[1]["notebook"] == "ok.ipynb"


def test_without_the_folder_on_this_machine_only_the_lexical_checks_apply(tmp_path: Path) -> None:
    config = ExecutorConfig(notebooks_dir=tmp_path / "not-here")
    body = {"name": "t", "executor": "notebook", "notebook": "later.ipynb"}
    assert parse_task_body(body, config=config)[1]["notebook"] == "later.ipynb"


# -- parameters -----------------------------------------------------------------------------

PARAMS = """
days = 7
ratio: float = 0.5
name = "eu"
flag = False
items = [1, 2]
options = {"a": 1}
maybe = None
when = datetime.date.today()
label: Optional[str] = None
count: int | None = None
%matplotlib inline
"""


def test_declared_parameters_are_read_from_the_tagged_cell() -> None:
    declared = declared_parameters(notebook(PARAMS, "print(days)"))
    assert declared is not None
    assert set(declared) == {
        "days",
        "ratio",
        "name",
        "flag",
        "items",
        "options",
        "maybe",
        "when",
        "label",
        "count",
    }
    assert declared["days"].default == 7 and declared["ratio"].annotation == "float"


GOOD: list[dict[str, Any]] = [
    {"days": 3},
    {"ratio": 2},  # an int fits a float
    {"ratio": 0.25, "name": "us", "flag": True},
    {"items": [], "options": {"b": 2}},
    {"maybe": "anything", "when": "2024-01-01"},
    {"label": None},
    {"label": "x", "count": 3},
    {"count": None},
]
BAD: list[tuple[dict[str, Any], str]] = [
    ({"dayz": 3}, "unknown parameter"),
    ({"days": "seven"}, "must be int"),
    ({"days": 1.5}, "must be int"),
    ({"days": True}, "must be int"),
    ({"flag": 1}, "must be bool"),
    ({"name": 5}, "must be str"),
    ({"items": {"a": 1}}, "must be list"),
    ({"options": [1]}, "must be dict"),
    ({"label": 5}, "must be Optional"),
    ({"count": "3"}, "must be int | None"),
]


@pytest.mark.parametrize("values", GOOD)
def test_values_fitting_the_declared_defaults_pass(values: dict[str, Any]) -> None:
    check_against_notebook(notebook(PARAMS), values)


@pytest.mark.parametrize(("values", "message"), BAD)
def test_values_not_fitting_are_spec_errors_naming_parameters(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError, match=message) as err:
        check_against_notebook(notebook(PARAMS), values)
    assert err.value.field == "parameters"


def test_without_a_parameters_cell_every_parameter_is_unknown() -> None:
    with pytest.raises(SpecError, match="no cell is tagged 'parameters'"):
        check_against_notebook(notebook(None, "print(1)"), {"x": 1})
    check_against_notebook(notebook(None, "print(1)"), {})


def test_other_languages_and_unreadable_cells_are_not_guessed() -> None:
    r_notebook = notebook("days <- 7")
    r_notebook.metadata["kernelspec"]["language"] = "R"
    check_against_notebook(r_notebook, {"anything": 1})
    check_against_notebook(notebook("days = (7"), {"anything": 1})


# -- snapshots ------------------------------------------------------------------------------


def test_snapshot_versions_follow_the_content() -> None:
    first = json.loads(nbformat.writes(notebook("x = 1", "print(x)")))
    second = json.loads(nbformat.writes(notebook("x = 1", "print(x * 2)")))
    v1 = stamp_version(NotebookSpec(notebook_content=first))
    assert v1.notebook_version == 1 and v1.notebook_sha256
    assert stamp_version(v1) == v1
    reordered = NotebookSpec(
        notebook_content=dict(reversed(list(first.items()))),
        notebook_version=1,
        notebook_sha256=v1.notebook_sha256,
    )
    assert stamp_version(reordered).notebook_version == 1  # key order is not a change
    changed = NotebookSpec(
        notebook_content=second, notebook_version=1, notebook_sha256=v1.notebook_sha256
    )
    v2 = stamp_version(changed)
    assert v2.notebook_version == 2 and v2.notebook_sha256 != v1.notebook_sha256


def test_snapshot_fields_are_validated_at_parse_time() -> None:
    executor = get_executor("notebook")
    content = json.loads(nbformat.writes(notebook("days = 7")))
    spec = executor.parse_spec({"notebook_content": content, "parameters": {"days": 1}})
    assert spec.notebook_version == 1  # type: ignore[attr-defined]
    for fields, field in [
        ({"notebook_content": content, "parameters": {"weeks": 1}}, "parameters"),
        ({"notebook_content": {"cells": []}}, "notebook_content"),
        ({"notebook_content": content, "notebook": "x.ipynb"}, "notebook"),
        ({"notebook": "x.ipynb", "parameters": {"not-an-identifier": 1}}, "parameters"),
        ({"notebook": "x.ipynb", "kernel": "../../bin/sh"}, "kernel"),
    ]:
        with pytest.raises(SpecError) as err:
            executor.parse_spec(fields)
        assert err.value.field == field, fields
