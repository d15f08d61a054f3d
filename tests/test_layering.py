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
    """Start-up and shutdown live in runtime, the composition root; the parts below it never
    start a server (the demo builds through it)."""
    graph = import_graph()
    users = {name for name, targets in graph.items() if "runtime" in targets}
    assert users <= {"cli", "demo"}
    assert "cli" not in {t for name in ("demo", "runtime", "service") for t in graph[name]}


#: Process-wide settings and app lifecycle hooks: what only the composition root may touch.
PROCESS_LEVERS = {
    ("gc", "disable"),
    ("gc", "enable"),
    ("gc", "freeze"),
    ("gc", "unfreeze"),
    ("sys", "setswitchinterval"),
}
LIFECYCLE_ATTRIBUTES = {"add_signal_handler", "cleanup_ctx", "on_startup", "on_cleanup"}
#: The fake Catalog API is a program of its own (`python -m exporter.simulator`).
OWN_PROGRAMS = {"simulator", "fakes3"}


def process_levers(source: str) -> set[str]:
    """`gc.freeze`, `sys.setswitchinterval`, signal handlers, aiohttp lifecycle hooks used."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if (owner, node.attr) in PROCESS_LEVERS:
                found.add(f"{owner}.{node.attr}")
            elif node.attr in LIFECYCLE_ATTRIBUTES:
                found.add(node.attr)
    return found


def test_the_lever_finder_finds_a_planted_freeze_and_hook() -> None:
    """The check below can fail: a module freezing the GC or adding a cleanup_ctx is seen."""
    source = "import gc\ngc.freeze()\napp.cleanup_ctx.append(f)\n"
    assert process_levers(source) == {"gc.freeze", "cleanup_ctx"}


def test_only_the_runtime_sets_process_settings_signals_and_lifecycles() -> None:
    """GC, switch interval, signal handlers and start/stop hooks live in the composition
    root (runtime), not in the CLI, the HTTP faces or the service."""
    users = {
        path.stem: levers
        for path in PACKAGE.glob("*.py")
        if path.stem not in {"runtime", *OWN_PROGRAMS}
        and (levers := process_levers(path.read_text(encoding="utf-8")))
    }
    assert users == {}
    assert process_levers((PACKAGE / "runtime.py").read_text(encoding="utf-8")) >= {
        "gc.freeze",
        "sys.setswitchinterval",
        "add_signal_handler",
    }


def test_the_supervisor_knows_nothing_of_what_it_runs() -> None:
    """The supervisor imports no exporter module: the service and the runtime hand it work."""
    assert import_graph()["supervisor"] == set()
