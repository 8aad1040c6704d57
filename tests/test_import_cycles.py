"""No import cycle between the watch code and the TensorBoard writer.

``gradscope.watching.scope`` builds a ``DashboardWriter``; the writer draws
``FlushResult``s.  Both used to import each other (the writer imported the
Scope's module for ``FlushResult`` and ``stats_norm``), so which module loaded
first decided which one saw the other half-initialised.  The check walks every
import statement of the package (also those inside functions, which run later
but still close a cycle; not those under ``if TYPE_CHECKING``), with the edge
that importing ``a.b.c`` runs ``a/b/__init__.py`` first.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gradscope"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imported_names(name: str, path: Path) -> set[str]:
    """Dotted names of every import statement of a module, outside TYPE_CHECKING blocks."""
    names: set[str] = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package[: len(package) - (child.level - 1)]
                    base = ".".join(parent + ([base] if base else []))
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return names


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules its import statements run (parent packages included;
    the root package is lazy, PEP 562, and left out)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for imported in _imported_names(name, path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]  # `from pkg.mod import function`
            parts = imported.split(".") if imported else []
            for i in range(2, len(parts) + 1):
                edges.add(".".join(parts[:i]))
        edges.discard(name)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in graph:
        if v not in index:
            connect(v)
    return found


def _watch_or_tensorboard(module: str) -> bool:
    return module == "gradscope.tensorboard" or module.startswith("gradscope.watching")


def test_the_walk_finds_a_cycle_it_is_shown() -> None:
    """The walker itself: a made-up graph with a cycle through a lazy import."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [{"a", "b", "c"}]
    # and it reads the package: the scope imports its parts, the writer its dashboard charts
    real = _graph()
    assert "gradscope.watching.flush" in real["gradscope.watching.scope"]
    assert "gradscope.dashboards.charts" in real["gradscope.tensorboard"]
    assert "gradscope.tensorboard" in real["gradscope.watching.scope"]  # the lazy import in Scope.__init__


def test_no_import_cycle_through_the_watch_code_or_tensorboard() -> None:
    cycles = [sorted(c) for c in _cycles(_graph()) if any(_watch_or_tensorboard(m) for m in c)]
    assert cycles == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "first, second",
    [("gradscope.tensorboard", "gradscope.watching.scope"), ("gradscope.watching.scope", "gradscope.tensorboard")],
)
def test_either_import_order_works_in_a_fresh_process(first: str, second: str) -> None:
    code = (
        "import sys\n"
        f"import {first}\n"
        "loaded_scope = 'gradscope.watching.scope' in sys.modules\n"
        f"import {second}\n"
        "from gradscope.watching import FlushResult, Scope, watch\n"
        "from gradscope.tensorboard import DashboardWriter\n"
        "assert Scope.__module__ == 'gradscope.watching.scope'\n"
        "print(loaded_scope)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # The writer does not pull in the Scope: it needs only the flush result.
    assert done.stdout.strip() == ("False" if first == "gradscope.tensorboard" else "True")
