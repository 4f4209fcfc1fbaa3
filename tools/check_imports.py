"""Fail on an import cycle inside trio_chat/ or a module over 500 lines.

Every import counts, those under ``TYPE_CHECKING`` and inside functions included: a
typing-only cycle is still one a reader has to follow (issue 10). Imports are read with
``ast``, not by importing, so the check sees exactly what the source says. Run by
``make lint`` and by tests/test_layout.py.

Usage: python tools/check_imports.py [PACKAGE_DIR]   (default: trio_chat next to tools/)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Final

MAX_LINES: Final = 500


def module_names(root: Path) -> dict[str, Path]:
    """Map each module's dotted name (a package by its own name) to its file."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the package that ``name`` imports, wherever the import is written."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            # The longest prefix that is one of ours: `a.b.C` (a class) means module a.b.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles of each strongly connected component (Tarjan): the shortest through each module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            for member in sorted(component) if len(component) > 1 else ():
                cycle = _shortest_cycle(graph, set(component), member)
                # Each cycle once, however many of its modules it was found from.
                if not any(set(cycle) == set(seen) for seen in found):
                    found.append(cycle)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def _shortest_cycle(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest path from ``start`` back to itself inside its component (breadth first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for target in sorted(graph[module] & component):
                if target == start:
                    return [*paths[module], start]
                if target not in paths:
                    paths[target] = [*paths[module], target]
                    following.append(target)
        frontier = following
    raise AssertionError("a strongly connected component always has a cycle")


def problems(root: Path) -> list[str]:
    """Every cycle and every module over MAX_LINES, one line each (empty: all good)."""
    modules = module_names(root)
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    # A package's __init__ re-exports its modules: an edge from a package to its own
    # descendants is how packages work, not a cycle a reader has to follow.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    found = [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    for path in modules.values():
        with path.open(encoding="utf-8") as lines:
            count = sum(1 for _ in lines)
        if count > MAX_LINES:
            where = path.relative_to(root.parent)
            found.append(f"{where}: {count} lines (at most {MAX_LINES})")
    return found


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "trio_chat"
    found = problems(root)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
