"""The package's shape, read from its source with `ast`: the import graph has no cycle, only
the shell reads Hydra's config, the demo is a client that nothing else imports, and imports
only point down the floors.

The floors, top to bottom (`FLOORS`; the README's "How the code is laid out" shows the same):

    shell (cli, __main__, conf/), demo
    sweep
    evaluation
    predict, track, plots, checks
    model, score
    data
    config
    errors, mlflow_client

A module may import its own package and any package on a lower floor. Packages on one floor may
import each other only one way (the graph of packages has no cycle), so no two packages import
each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "evalharness"
SHELL = {"evalharness.__main__", "evalharness.cli"}
HYDRA_CALLBACK = "evalharness.sweep.callback"  # Hydra calls it with its config
STAGES = {"config", "model", "data", "predict", "score", "checks", "track", "plots", "sweep"}
MAX_LINES = 400
FLOORS: tuple[tuple[str, ...], ...] = (
    ("shell", "conf", "demo"),  # conf: the YAML Hydra composes, read by the shell
    ("sweep",),
    ("evaluation",),
    ("predict", "track", "plots", "checks"),
    ("model", "score"),
    ("data",),
    ("config",),
    ("errors", "mlflow_client"),
)
FLOOR_OF = {package: depth for depth, floor in enumerate(FLOORS) for package in floor}


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


def package_of(module: str) -> str:
    """The floor's name of `module`: ``shell`` for the entry points, else its package (or, for
    a module directly under ``evalharness``, the module itself)."""
    if module in SHELL or module == "evalharness":
        return "shell"
    return module.split(".")[1]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Which packages import which (a package's imports of itself left out)."""
    packages: dict[str, set[str]] = {}
    for module, deps in graph.items():
        mine = package_of(module)
        packages.setdefault(mine, set()).update(
            package_of(dep) for dep in deps if package_of(dep) != mine
        )
    for deps in list(packages.values()):
        for dep in deps:
            packages.setdefault(dep, set())
    return packages


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Every import (module, imported module) that runs up the floors."""
    return sorted(
        (module, dep)
        for module, deps in graph.items()
        for dep in deps
        if FLOOR_OF[package_of(dep)] < FLOOR_OF[package_of(module)]
    )


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
        assert lines <= MAX_LINES, f"{name}: {lines} lines"


def test_every_package_is_on_a_floor():
    packages = set(package_graph(internal_graph()))
    assert packages <= set(FLOOR_OF), sorted(packages - set(FLOOR_OF))
    assert packages >= STAGES


def test_imports_only_point_down_the_floors():
    graph = internal_graph()
    assert upward_imports(graph) == []
    assert find_cycle(package_graph(graph)) is None, find_cycle(package_graph(graph))


def test_an_import_running_up_a_floor_or_round_one_is_found():
    graph = {
        "evalharness.cli": {"evalharness.sweep.jobs"},
        "evalharness.sweep.jobs": {"evalharness.evaluation.run"},
        "evalharness.evaluation.run": {"evalharness.sweep.cache"},  # up: sweep is above
        "evalharness.sweep.cache": {"evalharness.errors"},
        "evalharness.errors": set(),
    }
    assert upward_imports(graph) == [("evalharness.evaluation.run", "evalharness.sweep.cache")]
    assert find_cycle(graph) is None  # no module cycle: only the floors catch it
    del graph["evalharness.evaluation.run"]
    graph["evalharness.sweep.jobs"] = {"evalharness.errors"}
    assert upward_imports(graph) == []
    same_floor = {
        "evalharness.predict.pipeline": {"evalharness.checks.probes"},
        "evalharness.checks.probes": set(),
        "evalharness.checks.leakage": {"evalharness.predict.memory"},
        "evalharness.predict.memory": set(),
    }
    assert upward_imports(same_floor) == []  # one floor, but the two packages import each other
    assert find_cycle(package_graph(same_floor)) == ["checks", "predict", "checks"]


def test_the_readme_layout_table_lists_every_module():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## How the code is laid out") :]
    missing = [
        name
        for name, path in modules().items()
        if path.name != "__init__.py" and f"`{path.stem}`" not in section
    ]
    assert missing == []


def test_test_files_have_unique_names():
    """pytest's default import mode imports each test file by its bare name: two files of one
    name in different folders stop the whole run at collection."""
    names = [path.name for path in (REPO / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
