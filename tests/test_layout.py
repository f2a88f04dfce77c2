"""The package's layout: every module imports, and no module reaches itself through its own
imports (module-level or inside functions), so the code reads one way, from the entry point
down (issue 17)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import smf_lightning

PACKAGE = Path(smf_lightning.__file__).resolve().parent


def package_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (packages by their __init__.py)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's own modules that ``name`` imports anywhere in its file (also inside
    functions: a lazy import closes a cycle as surely as a top-level one)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from .. import z
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith(PACKAGE.name):
                continue
            for alias in node.names:  # `from .pkg import module` imports the module itself
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(PACKAGE.name + "."))
    return {m for m in found if m in modules and m != name}


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_imports_resolve_to_package_modules():
    modules = package_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    # the entry point dispatches to the stages; the stages build the model in models/
    assert "smf_lightning.stages.continual" in graph["smf_lightning.train"]
    assert "smf_lightning.models.build" in graph["smf_lightning.stages.heal"]
    assert "smf_lightning.models.build" in graph["smf_lightning.stages.continual"]


def test_no_import_cycle_in_the_package():
    modules = package_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_every_module_imports():
    for name in package_modules():
        importlib.import_module(name)
