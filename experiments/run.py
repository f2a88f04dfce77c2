"""One entry point for the tools under experiments/tools/: benchmarks (``bench_*.py``: speed and
memory), diagnostics (``diag_*.py``: why a setting behaves as it does; no study rows) and checks
(``check_*.py``: does the framework run on this machine). Each tool prints its figures and saves
them under experiments/tools/results/; what each measures: docs/benchmarks.md, the last figures:
experiments/tools/BENCHMARKS.md. The studies have their own drivers (experiments/<study>/).

    python experiments/run.py --list                       # every tool, with what it does
    python experiments/run.py bench memory                 # experiments/tools/bench_memory.py
    python experiments/run.py bench memory --help          # the tool's own options
    python experiments/run.py diag learning --facts 20 --variants base,all,lr3
    python experiments/run.py check gpu --dry-run
"""

from __future__ import annotations

import argparse
import ast
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = {"bench": "benchmarks", "diag": "diagnostics", "check": "checks"}
# where the tools live
FOLDERS = (HERE / "tools",)


def tools() -> dict[tuple[str, str], Path]:
    """(kind, name) -> script of every tool: ``<kind>_<name>.py`` in FOLDERS (the first one found)."""
    found: dict[tuple[str, str], Path] = {}
    for folder in FOLDERS:
        for kind in KINDS:
            for path in sorted(folder.glob(f"{kind}_*.py")):
                found.setdefault((kind, path.stem[len(kind) + 1:]), path)
    return found


def summary(path: Path) -> str:
    """The first sentence of the script's docstring (read, not imported: the tools import torch)."""
    doc = ast.get_docstring(ast.parse(path.read_text(), filename=str(path))) or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    first = first.split(". ")[0].rstrip(".")
    return first if len(first) <= 100 else first[:99].rstrip() + "…"


def listing() -> str:
    lines = []
    for kind, title in KINDS.items():
        lines.append(f"{title} ({kind}):")
        lines += [f"  {kind + ' ' + name:<21} {summary(path)}" for (k, name), path in tools().items() if k == kind]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 usage="%(prog)s [--list] | KIND NAME [the tool's arguments ...]")
    ap.add_argument("--list", action="store_true", help="list every tool and what it does")
    ap.add_argument("kind", nargs="?", choices=sorted(KINDS))
    ap.add_argument("name", nargs="?")
    # the tool's own arguments (and its --help) pass through untouched
    head = [a for a in argv[:2] if not a.startswith("-")]
    args = ap.parse_args(argv[:len(head)] if head else argv)
    if args.list or args.kind is None:
        print(listing())
        return
    known = tools()
    if args.name is None or (args.kind, args.name) not in known:
        names = ", ".join(n for k, n in known if k == args.kind)
        ap.error(f"no {args.kind} tool named {args.name!r}; {args.kind} tools: {names} (--list: what each does)")
    path = known[(args.kind, args.name)]
    # run it as `python <path> ARGS` would: its folder first on sys.path, its own argv
    sys.path.insert(0, str(path.parent))
    sys.argv = [str(path), *argv[2:]]
    runpy.run_path(str(path), run_name="__main__")


if __name__ == "__main__":
    main()
