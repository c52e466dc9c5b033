"""Rooms that keep to themselves: which top-level packages of medserve may import which.

The imports are read from the source (ast), not by importing it, so an import
inside a function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "platform" / "medserve"

# The top-level rooms of medserve. Modules beside them (settings, errors,
# specs, catalog, metrics) are shared ground that any room may import.
ROOMS = {
    "gateway", "controlplane", "registry", "audit", "engines", "security",
    "db", "imaging", "reviews", "protocols", "bench", "cli", "console",
}


def _module_name(path: Path) -> list[str]:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported_modules(path: Path) -> set[str]:
    """Every medserve module a file imports, relative imports resolved."""
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package[:-1]
    return _imports_in(path.read_text(), package)


def _imports_in(source: str, package: list[str]) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # `from medserve import gateway` names a room too.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "medserve" or name.startswith("medserve.")}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else None


def room_imports() -> dict[tuple[str, str], set[str]]:
    """(importing room, imported room) -> the 'file -> module' lines that make the edge."""
    edges: dict[tuple[str, str], set[str]] = {}
    for path in sorted(SOURCE.rglob("*.py")):
        source_room = _room(".".join(_module_name(path)))
        if source_room is None:
            continue
        for module in _imported_modules(path):
            target_room = _room(module)
            if target_room is not None and target_room != source_room:
                line = f"{path.relative_to(SOURCE)} -> {module}"
                edges.setdefault((source_room, target_room), set()).add(line)
    return edges


def test_rooms_are_all_there():
    present = {path.name for path in SOURCE.iterdir() if (path / "__init__.py").exists()}
    assert ROOMS <= present, f"rooms missing from platform/medserve: {sorted(ROOMS - present)}"


def test_control_plane_imports_nothing_from_the_gateway():
    """The control plane names the gateway's import path as a string; it never imports it."""
    crossing = room_imports().get(("controlplane", "gateway"), set())
    assert crossing == set(), sorted(crossing)


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one room (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for source, target in edges:
        graph.setdefault(source, []).append(target)
        graph.setdefault(target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


# The one sanctioned loop: the gateway's app includes the console's router (and nothing else of it), while the
# console reads the gateway's state; test_console_keeps_to_its_own_imports... pins that edge down.
INCLUDED_ROUTERS = {("gateway", "console")}


def test_no_import_cycle_between_rooms():
    edges = {edge: lines for edge, lines in room_imports().items() if edge not in INCLUDED_ROUTERS}
    cycles = _cycles(set(edges))
    detail = {
        " <-> ".join(cycle): sorted(line for (a, b), lines in edges.items() if a in cycle and b in cycle for line in lines)
        for cycle in cycles
    }
    assert cycles == [], detail


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({("a", "b"), ("b", "c")}, []),
        ({("a", "b"), ("b", "a")}, [["a", "b"]]),
        ({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}, [["a", "b", "c"]]),
    ],
)
def test_cycle_finder_finds_cycles(edges, expected):
    assert _cycles(edges) == expected


def test_import_reader_sees_lazy_and_relative_imports():
    """An import inside a function is a crossing as much as one at the top; relative ones resolve."""
    source = (
        "import os\n"
        "from medserve.settings import Settings\n"
        "from . import app\n"
        "from ..engines.loader import load_engine\n"
        "def f():\n"
        "    from medserve.gateway.app import build_app\n"
    )
    found = _imports_in(source, ["medserve", "controlplane"])
    assert "medserve.gateway.app" in found
    assert "medserve.controlplane.app" in found
    assert "medserve.engines.loader" in found
    assert "medserve.settings" in found and "os" not in found


def test_console_keeps_to_its_own_imports_and_only_the_gateway_app_imports_it():
    """The console may read the gateway's state, the reviews, security and the database; the gateway
    imports it only to include its router (so the inference routes never run console code)."""
    edges = room_imports()
    allowed = {"gateway", "reviews", "security", "db"}
    assert {target for (source, target) in edges if source == "console"} <= allowed
    importers = {line for (source, target), lines in edges.items() if target == "console" for line in lines}
    assert importers == {"gateway/app.py -> medserve.console.routes",
                         "gateway/app.py -> medserve.console.routes.router"}, sorted(importers)
