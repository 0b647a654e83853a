"""The package's layering: library modules import downward only, tools sit on top, and nothing cycles.

Imports are read from the source (module level and inside functions), so a cycle hidden by a late import
is found too. A module that calls ``importlib.import_module`` imports the modules named as strings in it
and in the modules it imports (the command line imports the tool modules its table names). Imports under
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


def read_imports(name: str) -> tuple[set[str], set[str], bool]:
    """(the catprune modules that module ``name`` imports, the catprune modules it names as strings,
    whether it calls ``importlib.import_module``)."""
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
    named: set[str] = set()
    dynamic = False
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Attribute) and node.attr == "import_module":
            dynamic = True
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
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in MODULES:
            named.add(node.value)
        found.update(target for target in targets if target in MODULES and target != name)
    return found, named, dynamic


IMPORTS = {name: read_imports(name) for name in MODULES}
GRAPH = {
    name: found | ((named.union(*(IMPORTS[target][1] for target in found)) - {name}) if dynamic else set())
    for name, (found, named, dynamic) in IMPORTS.items()
}


def is_tool(name: str) -> bool:
    return name.startswith("catprune.tools") or name in ("catprune.cli", "catprune.__main__")


def test_the_import_graph_is_read() -> None:
    assert "catprune.engine" in GRAPH["catprune.integration"]
    assert "catprune.tools.generate" in GRAPH["catprune.cli"]  # named as a string for importlib


@pytest.mark.parametrize("name", sorted(name for name in MODULES if not is_tool(name)))
def test_library_modules_do_not_import_tools(name: str) -> None:
    assert not [target for target in GRAPH[name] if is_tool(target)]


@pytest.mark.parametrize("name", sorted(name for name in MODULES if name.startswith("catprune.tools.")))
def test_tools_do_not_import_each_other_or_the_cli(name: str) -> None:
    """Commands share only the command table and the argument helpers."""
    shared = ("catprune.tools", "catprune.tools.arguments")
    assert not [target for target in GRAPH[name] if is_tool(target) and target not in shared]


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
