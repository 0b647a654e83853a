"""The package's layering: library modules import downward only, tools sit on top, and nothing cycles.

Imports are read from the source (module level and inside functions, plus module names given as strings,
as ``importlib.import_module`` takes them), so a cycle hidden by a late import is found too. Imports under
``if TYPE_CHECKING:`` are for annotations only and never run, so they are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "catprune"


def module_name(path: Path) -> str:
    parts = ["catprune", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}


def imported_modules(name: str) -> set[str]:
    """The catprune modules that module ``name`` imports (a package's submodule when one is named)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            targets = [node.value]
        found.update(target for target in targets if target in MODULES and target != name)
    return found


GRAPH = {name: imported_modules(name) for name in MODULES}


def is_tool(name: str) -> bool:
    return name.startswith("catprune.tools") or name in ("catprune.cli", "catprune.__main__")


def test_the_import_graph_is_read() -> None:
    assert "catprune.pruning" in GRAPH["catprune.integration"]
    assert "catprune.tools.generate" in GRAPH["catprune.cli"]  # named as a string for importlib


@pytest.mark.parametrize("name", sorted(name for name in MODULES if not is_tool(name)))
def test_library_modules_do_not_import_tools(name: str) -> None:
    assert not [target for target in GRAPH[name] if is_tool(target)]


@pytest.mark.parametrize("name", sorted(name for name in MODULES if name.startswith("catprune.tools.")))
def test_tools_do_not_import_each_other_or_the_cli(name: str) -> None:
    assert not [target for target in GRAPH[name] if is_tool(target) and target != "catprune.tools"]


def test_no_import_cycles() -> None:
    """Depth-first search; a package's ``__init__`` importing its own submodules is an edge like any other."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycle = [*stack[stack.index(target) :], target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
