"""The package's shape: no import circle among ``peft_scale``'s modules, one test file per module, and test files that
share helpers through ``conftest.py`` / ``tiny_models.py``, not through each other. Read from the source (``ast``),
importing nothing."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "peft_scale"

# A module whose tests are still elsewhere, with where they are: a named exception, to be emptied.
NO_TEST_FILE_YET: dict[str, str] = {}


# Test files that still import another test file's helpers, with the files they import: to be emptied.
IMPORTS_OF_TEST_FILES: dict[str, set[str]] = {}


def package_modules() -> list[str]:
    """The package's module names (``__init__`` as ``peft_scale``), sorted."""
    names = ("peft_scale" if path.stem == "__init__" else f"peft_scale.{path.stem}" for path in PACKAGE.glob("*.py"))
    return sorted(names)


def imported_modules(module: str, source: str | None = None, known: set[str] | None = None) -> set[str]:
    """The package modules ``module`` imports anywhere in its source: at the top, in a function or under
    ``if TYPE_CHECKING`` (an import moved into a function to dodge a circle is still the circle). ``peft_scale``
    stands for the package's ``__init__``: ``import peft_scale``, ``from . import ScaleConfig``. ``source`` and
    ``known`` (the package's modules) default to the file's text and the modules on disk."""
    if source is None:
        source = (PACKAGE / ("__init__.py" if module == "peft_scale" else f"{module.split('.')[1]}.py")).read_text()
    known = set(package_modules()) if known is None else known

    def owner(name: str) -> str:
        # `peft_scale.layer.Linear` -> `peft_scale.layer`: the longest prefix that is a module ("" outside).
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name

    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {owner(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            # `from .x import y` / `from peft_scale.x import y` import x; `from . import y` imports the module y
            # where there is one, else the package's own name y.
            base = ("peft_scale" + (f".{node.module}" if node.module else "")) if node.level else (node.module or "")
            found |= {owner(f"{base}.{alias.name}") for alias in node.names}
    return found - {"", module}


def import_graph() -> dict[str, set[str]]:
    return {module: imported_modules(module) for module in package_modules()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each once, as the list of modules along it (the strongly connected components of more
    than one module; Tarjan's algorithm), with one circle through each such component spelled out."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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
    return [circle_through(graph, component) for component in components]


def circle_through(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One circle inside a strongly connected component: from its first module back to it (breadth first)."""
    start, members = component[0], set(component)
    paths = {target: [start, target] for target in sorted(graph[start] & members)}
    frontier = list(paths)
    while start not in paths:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & members):
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    return paths[start]


def test_the_cycle_finder_names_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_every_kind_of_import():
    source = """
import torch
from typing import TYPE_CHECKING
from .layer import Linear
from peft_scale.norm import RMSNorm
from . import plan, ScaleConfig
import peft_scale.routing
if TYPE_CHECKING:
    from .model import ScaleModel
def merge():
    from .experts import Experts
"""
    known = {f"peft_scale.{name}" for name in ("layer", "norm", "plan", "routing", "model", "experts", "merge")}
    known.add("peft_scale")
    assert imported_modules("peft_scale.merge", source, known) == {
        "peft_scale.layer", "peft_scale.norm", "peft_scale.plan", "peft_scale", "peft_scale.routing",
        "peft_scale.model", "peft_scale.experts",
    }  # fmt: skip
    assert imported_modules("peft_scale.layer", "from .layer import x\nimport numpy", known) == set()
    assert "peft_scale.model" in import_graph()["peft_scale.registration"]


def test_no_import_circle_in_the_package():
    cycles = import_cycles(import_graph())
    assert not cycles, "import circles in peft_scale: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_every_module_has_its_test_file():
    modules = [module.split(".")[-1] for module in package_modules() if module != "peft_scale"]
    missing = [f"tests/test_{name}.py" for name in modules if not (REPO / "tests" / f"test_{name}.py").exists()]
    excepted = [f"tests/test_{name}.py" for name in NO_TEST_FILE_YET]
    assert set(missing) <= set(excepted), f"peft_scale modules without their test file: {missing}"
    if set(missing) != set(excepted):  # an exception that is no longer needed: not a failure, but say so
        warnings.warn(f"NO_TEST_FILE_YET names modules that have their test file now: {set(excepted) - set(missing)}")


def test_no_test_file_imports_another():
    tests = REPO / "tests"
    found = {}
    for path in sorted(tests.rglob("test_*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        imported = {name for name in names if name.split(".")[-1].startswith("test_")}
        if imported:
            found[path.relative_to(tests).as_posix()] = imported
    new = {path: names - IMPORTS_OF_TEST_FILES.get(path, set()) for path, names in found.items()}
    new = {path: names for path, names in new.items() if names}
    assert not new, f"test files importing other test files: {new}; shared helpers go to conftest.py or tiny_models.py"
    if found != IMPORTS_OF_TEST_FILES:  # an exception that is no longer needed: not a failure, but say so
        warnings.warn(f"IMPORTS_OF_TEST_FILES is out of date: the test files import {found}")
