"""service.store, the parts that need no database: cycle detection and the named SQL blocks."""

from __future__ import annotations

import itertools
import re

import pytest

from service.store import find_cycle, queries


def test_no_cycle() -> None:
    graph = {"c": ["b"], "b": ["a"], "a": []}
    assert find_cycle(graph, "c") is None
    assert find_cycle(graph, "a") is None


def test_no_cycle_in_a_diamond() -> None:
    # d depends on b and c, both depend on a: shared upstreams are not a cycle.
    graph = {"d": ["b", "c"], "b": ["a"], "c": ["a"], "a": []}
    assert find_cycle(graph, "d") is None


def test_direct_cycle() -> None:
    assert find_cycle({"a": ["b"], "b": ["a"]}, "a") == ["a", "b", "a"]


def test_self_cycle() -> None:
    assert find_cycle({"a": ["a"]}, "a") == ["a", "a"]


def test_longer_cycle() -> None:
    graph = {"a": ["b"], "b": ["c"], "c": ["d"], "d": ["a"], "x": ["a"]}
    assert find_cycle(graph, "a") == ["a", "b", "c", "d", "a"]
    assert find_cycle(graph, "c") == ["c", "d", "a", "b", "c"]


def test_cycle_elsewhere_does_not_involve_start() -> None:
    # x reaches a cycle (a <-> b) but is not on it; only start-to-start paths count.
    graph = {"x": ["a"], "a": ["b"], "b": ["a"]}
    assert find_cycle(graph, "x") is None


def test_independent_nodes_and_unknown_upstreams() -> None:
    graph = {"a": [], "b": [], "c": ["missing"]}
    for node in ("a", "b", "c", "not-in-graph"):
        assert find_cycle(graph, node) is None


def test_cycle_path_follows_real_edges() -> None:
    graph = {"a": ["z", "b"], "b": ["y", "c"], "c": ["a"], "z": [], "y": []}
    path = find_cycle(graph, "a")
    assert path is not None and path[0] == path[-1] == "a"
    assert all(nxt in graph[node] for node, nxt in itertools.pairwise(path))


QUERIES = queries()


def test_queries_are_loaded() -> None:
    assert len(QUERIES) >= 10
    for name in ("insert_task", "get_task_by_id", "due_tasks", "insert_run", "set_next_fire_times"):
        assert name in QUERIES


def test_block_names_are_unique() -> None:
    from importlib.resources import files

    text = files("service").joinpath("queries.sql").read_text()
    names = re.findall(r"^-- name: (\w+)\s*$", text, flags=re.MULTILINE)
    assert len(names) == len(set(names)) == len(QUERIES)


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_block_is_non_empty_sql(name: str) -> None:
    sql = QUERIES[name]
    body = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    assert body.strip(), f"{name} has no SQL"
    assert "-- name:" not in sql


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_block_uses_only_named_parameters(name: str) -> None:
    sql = QUERIES[name]
    # Strip the named placeholders and literal %% escapes; no other % may remain.
    leftover = re.sub(r"%\(\w+\)s|%%", "", sql)
    assert "%" not in leftover, f"{name} has a positional or malformed placeholder"
