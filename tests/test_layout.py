"""The package's shape, read from its source with `ast`: the import graph has no cycle, only
the shell reads Hydra's config, and the demo is a client that nothing else imports."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "evalharness"
SHELL = {"evalharness.__main__", "evalharness.cli"}
HYDRA_CALLBACK = "evalharness.sweep.callback"  # Hydra calls it with its config
STAGES = {"config", "model", "data", "predict", "score", "checks", "track", "plots", "sweep"}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str) -> set[str]:
    """Every module `path` imports (top level or inside functions), absolute names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def internal_graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: {dep for dep in imports_of(path, name) if dep in known and dep != name}
        for name, path in known.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = internal_graph()
    assert len(graph) > 30  # the whole package was read
    assert find_cycle(graph) is None, find_cycle(graph)


def test_a_cycle_is_found_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_shell_and_the_hydra_callback_import_hydra_or_omegaconf():
    readers = {
        name
        for name, path in modules().items()
        if any(dep.split(".")[0] in ("hydra", "omegaconf") for dep in imports_of(path, name))
    }
    assert readers <= SHELL | {HYDRA_CALLBACK}, readers - SHELL
    assert "evalharness.cli" in readers


def test_only_the_shell_imports_the_demo():
    graph = internal_graph()
    importers = {
        name
        for name, deps in graph.items()
        if not name.startswith("evalharness.demo")
        and any(dep.startswith("evalharness.demo") for dep in deps)
    }
    assert importers <= SHELL, importers


def test_packages_are_the_stages_of_the_data_flow_and_modules_stay_small():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages >= STAGES
    for name, path in modules().items():
        assert path.read_text().strip().startswith('"""'), f"{name}: no module docstring"
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES + 50, f"{name}: {lines} lines"
