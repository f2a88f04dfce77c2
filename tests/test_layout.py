"""The package's layout: every module imports, and no module reaches itself through its own
imports (module-level or inside functions), so the code reads one way, from the entry point
down. The same holds one level up, between the subpackages (``memory``, ``selection``, ...;
a top-level module is a package of its own): selection imports memory, so memory never
imports selection. Only the cycles listed in ``KNOWN_PACKAGE_CYCLES`` remain (none do).
And no module of the packages that compose a run (``streams``, ``stages``) grows past
``MODULE_LINE_BUDGET`` lines: one job per module."""

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


# Package-level import cycles that remain for now, each as the set of packages that import one
# another (one strongly connected component of the package graph). Nothing else may form one, and
# an entry whose packages no longer form exactly that cycle fails the test, so the list cannot go stale.
KNOWN_PACKAGE_CYCLES: set[frozenset[str]] = set()


def package_of(module: str) -> str:
    """The package a module belongs to: ``smf_lightning.memory.layer`` -> ``memory``; a top-level
    module is its own package (``smf_lightning.train`` -> ``train``), the root is ``smf_lightning``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Package -> the other packages its modules import (imports within a package dropped)."""
    packages: dict[str, set[str]] = {package_of(m): set() for m in graph}
    for module, targets in graph.items():
        packages[package_of(module)].update(package_of(t) for t in targets)
    for package, targets in packages.items():
        targets.discard(package)
    return packages


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of ``graph`` (Tarjan): a component of more than one
    node is a set of nodes that all reach one another, i.e. an import cycle among them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def package_cycle_problems(graph: dict[str, set[str]], known: set[frozenset[str]]) -> list[str]:
    """What is wrong with the package graph of the module graph ``graph``: every package cycle
    not in ``known`` (with one cycle through it and the module-level imports that make it), and
    every ``known`` entry that is no longer exactly one cycle."""
    packages = package_graph(graph)
    cycles = {frozenset(c) for c in strongly_connected(packages) if len(c) > 1}
    problems = []
    for cycle in sorted(cycles - known, key=sorted):
        path = find_cycle({p: packages[p] & cycle for p in cycle})
        edges = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                       if package_of(a) in cycle and package_of(b) in cycle and package_of(a) != package_of(b))
        problems.append(f"import cycle between packages {' -> '.join(path)}; the module-level imports "
                        f"between {sorted(cycle)}:\n" + "\n".join(f"    {e}" for e in edges))
    for stale in sorted(known - cycles, key=sorted):
        problems.append(f"KNOWN_PACKAGE_CYCLES lists {sorted(stale)}, but these packages no longer form exactly "
                        f"that cycle (it was removed, or grew into a larger one reported above): update the list.")
    return problems


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_inside_functions_count_and_type_checking_imports_do_not(tmp_path):
    path = tmp_path / "lazy.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from smf_lightning.selection import stats\n"
        "def build():\n"
        "    from ..memory import layer\n"
        "    import smf_lightning.data.facts\n"
    )
    modules = package_modules()
    found = imports_of("smf_lightning.stages.lazy", path, modules)
    assert found == {"smf_lightning.memory.layer", "smf_lightning.data.facts"}
    # in the package itself: the continual stage builds the data module inside a function
    graph = {name: imports_of(name, p, modules) for name, p in modules.items()}
    assert "smf_lightning.streams.datamodule" in graph["smf_lightning.stages.continual"]


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


def test_package_cycle_check_reports_new_cycles_with_their_imports_and_stale_entries():
    graph = {
        "smf_lightning.a.x": {"smf_lightning.b.y"},
        "smf_lightning.b.y": {"smf_lightning.a.z"},
        "smf_lightning.a.z": set(),
        "smf_lightning.top": {"smf_lightning.a.x"},  # a top-level module is a package of its own
    }
    assert package_graph(graph) == {"a": {"b"}, "b": {"a"}, "top": {"a"}}
    [problem] = package_cycle_problems(graph, set())
    assert "a -> b -> a" in problem
    assert "smf_lightning.a.x -> smf_lightning.b.y" in problem and "smf_lightning.b.y -> smf_lightning.a.z" in problem
    assert package_cycle_problems(graph, {frozenset({"a", "b"})}) == []
    [new, stale] = package_cycle_problems(graph, {frozenset({"a", "top"})})
    assert "a -> b -> a" in new and "['a', 'top']" in stale
    graph["smf_lightning.b.y"] = set()  # the cycle is gone: its allow-list entry is stale
    [stale] = package_cycle_problems(graph, {frozenset({"a", "b"})})
    assert "KNOWN_PACKAGE_CYCLES" in stale


def test_no_import_cycle_between_packages():
    modules = package_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert "memory" in package_graph(graph)["selection"]  # the direction: selection reads memory layers
    problems = package_cycle_problems(graph, KNOWN_PACKAGE_CYCLES)
    assert not problems, "\n".join(problems)


# The packages that compose a run out of the layers below, and the budget of lines any one of
# their modules may have. Each module does one job (building a stream, probing the model, serving
# suites, the background corpus, a stage's corpus, loop or files); a module past the budget has
# taken on another: give that job a module of its own rather than raising the budget.
BUDGETED_PACKAGES = ("streams", "stages")
MODULE_LINE_BUDGET = 450


def test_composing_modules_stay_within_their_line_budget():
    sizes = {name: len(path.read_text().splitlines()) for name, path in package_modules().items()
             if package_of(name) in BUDGETED_PACKAGES}
    assert {package_of(name) for name in sizes} == set(BUDGETED_PACKAGES)
    over = {name: n for name, n in sizes.items() if n > MODULE_LINE_BUDGET}
    assert not over, (f"modules over {MODULE_LINE_BUDGET} lines: {over}; split the extra job into a module of its "
                      f"own (streams/__init__.py and stages/__init__.py list each module's job)")


def test_every_module_imports():
    for name in package_modules():
        importlib.import_module(name)


# ---- the product's configs and the studies' ----

# Study row folders still in conf/experiment/, each to move into its study's folder
# (experiments/<study>/conf/experiment/<study>/): none; an entry that is gone fails the test, so the
# list cannot go stale.
STUDY_ROWS_STILL_IN_CONF = set()


def test_conf_experiment_holds_the_products_experiments():
    """conf/experiment/ holds the product's experiments; a study's row configs (and the base
    experiments only its rows use) live in the study's folder, experiments/<study>/conf/, which its
    driver puts on Hydra's search path. Every product experiment, the Makefile's `make train` one
    among them, composes from conf/ alone: the product needs no study file."""
    import re

    from hydra import compose, initialize_config_dir

    from smf_lightning.train import conf_dir

    root = Path(conf_dir()) / "experiment"
    assert {p.name for p in root.iterdir() if p.is_dir()} == STUDY_ROWS_STILL_IN_CONF
    experiments = sorted(p.stem for p in root.glob("*.yaml"))
    make_train = re.search(r"^EXPERIMENT\s*\?=\s*(\S+)", (PACKAGE.parents[1] / "Makefile").read_text(), re.M).group(1)
    assert make_train in experiments
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        for name in experiments:
            assert compose("train", overrides=[f"experiment={name}"]).task_name, name


def test_relative_links_of_the_pages_resolve():
    """Every relative link of README.md, docs/*.md and the study pages under experiments/ points to
    a file or folder that exists (the studies move; their pages and the docs must follow)."""
    import re

    root = PACKAGE.parents[1]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted((root / "experiments").rglob("*.md"))]
    broken = []
    for page in pages:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            target = link.split("#")[0]
            if target and not re.match(r"[a-z]+:", target) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(root)}: {link}")
    assert not broken, "broken links:\n" + "\n".join(broken)
