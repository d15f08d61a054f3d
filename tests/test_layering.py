"""The import graph: the house reads top-down, no module imports one that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "exporter"


def import_graph() -> dict[str, set[str]]:
    """exporter module -> the exporter modules it imports, lazy (in-function) imports included."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        name = path.stem
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "exporter":
                    targets.update(alias.name for alias in node.names)
                elif node.module.startswith("exporter."):
                    targets.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                targets.update(
                    a.name.split(".")[1] for a in node.names if a.name.startswith("exporter.")
                )
        graph[name] = {t for t in targets if (PACKAGE / f"{t}.py").exists()} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for target in sorted(graph.get(node, ())):
            cycle = visit(target, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    """The check below can fail: a graph with a cycle is reported with its path."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_exporter_module_imports_one_that_imports_it_back() -> None:
    """cli -> runtime -> service -> parts, lazily imported modules (demo, report) included."""
    graph = import_graph()
    assert {"cli", "runtime", "service", "demo"} <= graph.keys()
    assert find_cycle(graph) is None


def test_only_the_cli_and_the_demo_reach_the_runtime() -> None:
    """Start-up and shutdown live in runtime; the parts below it never start a server."""
    graph = import_graph()
    users = {name for name, targets in graph.items() if "runtime" in targets}
    assert users <= {"cli", "demo"}
    assert "cli" not in {t for name in ("demo", "runtime", "service") for t in graph[name]}
