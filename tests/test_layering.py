"""The import graph: the house reads top-down, and each module keeps to its own.

The rules, checked on every module under exporter/ (subpackages included):
- no module imports one that imports it back (no cycles);
- only `cli` and `demo` reach `runtime`;
- the test doubles stay out of the serving path: only `demo` imports `exporter.simulator`
  (and the simulator's own modules each other), and nothing imports `demo` at module level, so
  the exporter loads the simulator only when `cli` is asked for `--demo`;
- no module uses another module's private names: neither `from exporter.x import _y` nor
  `x._y` on a module or on a name imported from one; a private module (`_x.py`) is for its own
  package. (Private attributes of objects, `obj._y`, need types to check and are left to
  review.) The rules are for exporter/: tests may reach into a module's privates.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "exporter"
ROOT = "exporter"
#: The test doubles: the demo's, the tests' and the benchmarks' fake API and fake S3.
SIMULATOR = "simulator"
#: The one module outside the simulator allowed to import it.
SIMULATOR_USERS = frozenset({"demo"})


def read_package(package: Path = PACKAGE) -> dict[str, ast.Module]:
    """Module name (`cli`, `simulator`, `simulator.api`; the root is `__init__`) -> its tree."""
    modules: dict[str, ast.Module] = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        modules[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return modules


def parse(sources: Mapping[str, str]) -> dict[str, ast.Module]:
    """`read_package` for modules given as text: the planted violations below."""
    return {name: ast.parse(text) for name, text in sources.items()}


def is_private(name: str) -> bool:
    """`_y`, but not a dunder (`__version__`) nor an enum's sunder (`_value_`)."""
    return name.startswith("_") and not name.endswith("_")


def is_package(name: str, modules: Mapping[str, object]) -> bool:
    return name == "__init__" or any(m.startswith(f"{name}.") for m in modules)


def in_package(name: str) -> str:
    """The package a module is in, "" for the root."""
    return name.rpartition(".")[0]


@dataclass(frozen=True, slots=True)
class Import:
    """One exporter module naming another: `target` is a module; `names` what it takes."""

    importer: str
    target: str
    names: tuple[str, ...]
    eager: bool  # runs when the importer is imported (not inside a function or TYPE_CHECKING)
    line: int


class _Collector(ast.NodeVisitor):
    """Imports of exporter modules in one module, resolved to module names."""

    def __init__(self, module: str, modules: Mapping[str, object]) -> None:
        self.module = module
        self.modules = modules
        self.lazy_depth = 0
        self.found: list[Import] = []

    def resolve(self, absolute: str) -> str | None:
        """`exporter.x.y` -> `x.y`; `exporter` -> `__init__`; None outside the package."""
        if absolute == ROOT:
            return "__init__"
        if absolute.startswith(f"{ROOT}."):
            return absolute.removeprefix(f"{ROOT}.")
        return None

    def base_of(self, node: ast.ImportFrom) -> str | None:
        if node.level == 0:
            return self.resolve(node.module or "")
        package = self.module if is_package(self.module, self.modules) else in_package(self.module)
        parts = package.split(".") if package and package != "__init__" else []
        parts = parts[: len(parts) - (node.level - 1)]
        if node.module:
            parts.append(node.module)
        return ".".join(parts) if parts else "__init__"

    def _add(self, target: str, names: Iterable[str], line: int) -> None:
        if target != self.module:
            eager = self.lazy_depth == 0
            self.found.append(Import(self.module, target, tuple(names), eager, line))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            target = self.resolve(alias.name)
            if target is not None:
                self._add(target, (), node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self.base_of(node)
        if base is None:
            return
        prefix = "" if base == "__init__" else f"{base}."
        submodules = [a.name for a in node.names if f"{prefix}{a.name}" in self.modules]
        for name in submodules:
            self._add(f"{prefix}{name}", (), node.lineno)
        others = [a.name for a in node.names if a.name not in submodules]
        if others or not submodules:
            self._add(base, others, node.lineno)

    def _lazily(self, node: ast.AST) -> None:
        self.lazy_depth += 1
        self.generic_visit(node)
        self.lazy_depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _lazily

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
        if name != "TYPE_CHECKING":
            self.generic_visit(node)
            return
        self.lazy_depth += 1
        for child in node.body:
            self.visit(child)
        self.lazy_depth -= 1
        for child in node.orelse:
            self.visit(child)


def imports(modules: Mapping[str, ast.Module]) -> list[Import]:
    """Every import of an exporter module by an exporter module, lazy ones included."""
    found: list[Import] = []
    for name, tree in modules.items():
        collector = _Collector(name, modules)
        collector.visit(tree)
        found.extend(i for i in collector.found if i.target in modules)
    return found


def import_graph(modules: Mapping[str, ast.Module] | None = None) -> dict[str, set[str]]:
    """exporter module -> the exporter modules it imports, lazy (in-function) imports included."""
    modules = read_package() if modules is None else modules
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for found in imports(modules):
        graph[found.importer].add(found.target)
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


def is_simulator(name: str) -> bool:
    return name == SIMULATOR or name.startswith(f"{SIMULATOR}.")


def simulator_violations(modules: Mapping[str, ast.Module]) -> list[str]:
    """Imports that put the test doubles on the serving path, as `importer:line -> target`."""
    found = imports(modules)
    problems = [
        f"{i.importer}:{i.line} -> {i.target}"
        for i in found
        if is_simulator(i.target) and not is_simulator(i.importer)
        if i.importer not in SIMULATOR_USERS
    ]
    problems += [
        f"{i.importer}:{i.line} -> {i.target} at module level (import it where it is used)"
        for i in found
        if i.target in SIMULATOR_USERS and i.eager
    ]
    return problems


def _bindings(tree: ast.Module, module: str, modules: Mapping[str, object]) -> dict[str, str]:
    """Local name -> what it is: an exporter module (`x`) or a name in one (`x:Name`)."""
    bound: dict[str, str] = {}
    collector = _Collector(module, modules)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = collector.resolve(alias.name)
                if target is None:
                    continue
                if alias.asname:
                    bound[alias.asname] = target
                else:
                    bound[alias.name.split(".")[0]] = "__init__"
        elif isinstance(node, ast.ImportFrom):
            base = collector.base_of(node)
            if base is None:
                continue
            prefix = "" if base == "__init__" else f"{base}."
            for alias in node.names:
                local = alias.asname or alias.name
                if f"{prefix}{alias.name}" in modules:
                    bound[local] = f"{prefix}{alias.name}"
                else:
                    bound[local] = f"{base}:{alias.name}"
    return bound


def _chain(node: ast.expr) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"]; None for anything but names and attributes."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _within(module: str, package: str) -> bool:
    """Whether a module is in a package (the root, "", holds every module) or is the package."""
    return not package or module == package or module.startswith(f"{package}.")


def private_name_violations(modules: Mapping[str, ast.Module]) -> list[str]:
    """Uses of another module's private names, as `importer:line: what`."""
    problems: list[str] = []
    for found in imports(modules):
        leaf = found.target.rpartition(".")[2]
        if is_private(leaf) and not _within(found.importer, in_package(found.target)):
            problems.append(f"{found.importer}:{found.line}: imports private module {found.target}")
        problems += [
            f"{found.importer}:{found.line}: from {found.target} import {name}"
            for name in found.names
            if is_private(name)
        ]
    for module, tree in modules.items():
        bound = _bindings(tree, module, modules)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not is_private(node.attr):
                continue
            chain = _chain(node.value)
            if chain is None or chain[0] not in bound:
                continue
            owner = bound[chain[0]]
            for part in chain[1:]:
                if ":" in owner:
                    break  # an attribute of an imported object: its owner is the module
                prefix = "" if owner == "__init__" else f"{owner}."
                if f"{prefix}{part}" not in modules:
                    owner = f"{owner}:{part}"
                    break
                owner = f"{prefix}{part}"
            if owner.partition(":")[0] != module:
                problems.append(f"{module}:{node.lineno}: {'.'.join(chain)}.{node.attr}")
    return sorted(problems)


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    """The check below can fail: a graph with a cycle is reported with its path."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_resolves_subpackages_and_relative_imports() -> None:
    """`from exporter.simulator import api`, `exporter.simulator.api` and `.api` all name it."""
    modules = parse(
        {
            "demo": "from exporter.simulator import api, Fault\nimport exporter.simulator.fakes3",
            "simulator": "from .api import Fault",
            "simulator.api": "from . import fakes3\nfrom exporter import models",
            "simulator.fakes3": "",
            "models": "",
        }
    )
    assert import_graph(modules) == {
        "demo": {"simulator", "simulator.api", "simulator.fakes3"},
        "simulator": {"simulator.api"},
        "simulator.api": {"simulator.fakes3", "models"},
        "simulator.fakes3": set(),
        "models": set(),
    }


def test_no_exporter_module_imports_one_that_imports_it_back() -> None:
    """cli -> runtime -> service -> parts, lazily imported modules (demo, report) included."""
    graph = import_graph()
    assert {"cli", "runtime", "service", "demo", "simulator", "simulator.api"} <= graph.keys()
    assert "simulator.fakes3" in graph["simulator.api"]
    assert find_cycle(graph) is None


def test_only_the_cli_and_the_demo_reach_the_runtime() -> None:
    """Start-up and shutdown live in runtime, the composition root; the parts below it never
    start a server (the demo builds through it)."""
    graph = import_graph()
    users = {name for name, targets in graph.items() if "runtime" in targets}
    assert users <= {"cli", "demo"}
    assert "cli" not in {t for name in ("demo", "runtime", "service") for t in graph[name]}


def test_the_simulator_check_catches_a_serving_module_importing_it() -> None:
    """The check below can fail: a serving module importing the simulator, directly or through
    its package, or importing the demo at module level, is reported; the demo and cli's lazy
    import of it are not."""
    allowed = {
        "cli": "def main():\n    from exporter.demo import run_demo",
        "demo": "from exporter.simulator import Simulator",
        "simulator": "from exporter.simulator.api import Simulator",
        "simulator.api": "from exporter.simulator import fakes3",
        "simulator.fakes3": "",
    }
    assert simulator_violations(parse(allowed)) == []
    planted = {
        **allowed,
        "server": "import exporter.simulator.api",
        "service": "def build():\n    from exporter.simulator import fakes3",
        "runtime": "from exporter import demo",
    }
    assert simulator_violations(parse(planted)) == [
        "server:1 -> simulator.api",
        "service:2 -> simulator.fakes3",
        "runtime:1 -> demo at module level (import it where it is used)",
    ]


def test_no_serving_module_imports_the_simulator() -> None:
    """The fake API and fake S3 are loaded by the demo alone, and the demo only for --demo."""
    modules = read_package()
    assert {"demo", "simulator", "simulator.api", "simulator.fakes3"} <= modules.keys()
    assert simulator_violations(modules) == []


def test_the_private_name_check_catches_planted_uses() -> None:
    """The check below can fail: a private name imported, or read off another module or off a
    name imported from one, is reported; a module's own, dunders and aliases are not."""
    allowed = {
        "__init__": "__version__ = '1'",
        "a": (
            "from exporter import __version__\n"
            "from exporter.b import helper as _helper\n"
            "_own = 1\n"
            "print(_own, _helper, __version__)\n"
        ),
        "b": "def helper(): pass\ndef _hidden(): pass\nclass K:\n    _slot = 1",
        "pkg": "from exporter.pkg._impl import thing",
        "pkg.api": "from exporter.pkg import _impl",
        "pkg._impl": "",
    }
    assert private_name_violations(parse(allowed)) == []
    planted = {
        **allowed,
        "c": "from exporter.b import _hidden, helper",
        "d": "import exporter.b as b\nb._hidden()",
        "e": "from exporter import b\nimport exporter.pkg.api\nb._hidden\nexporter.pkg.api._x",
        "f": "from exporter.b import K\nK._slot",
        "g": "from exporter.pkg import _impl",
    }
    assert private_name_violations(parse(planted)) == [
        "c:1: from b import _hidden",
        "d:2: b._hidden",
        "e:3: b._hidden",
        "e:4: exporter.pkg.api._x",
        "f:2: K._slot",
        "g:1: imports private module pkg._impl",
    ]


def test_no_module_uses_another_modules_private_names() -> None:
    """A module's private names can change without a look at the others."""
    assert private_name_violations(read_package()) == []


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
    """The supervisor imports no exporter module but the shared backoff: the service and the
    runtime hand it work."""
    assert import_graph()["supervisor"] == {"backoff"}
