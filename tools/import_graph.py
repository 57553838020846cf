"""Prints the import graph of the bnconvert package and fails on a cycle.

Every `import` and `from ... import` of a bnconvert module counts, at module
level or inside a function (a deferred import is still a dependency). Run:

    python tools/import_graph.py

Exit status 0 when the graph is acyclic; 1, with the cycle printed, when not.
"""

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "bnconvert"


def module_name(path):
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules():
    found = {module_name(p): p for p in (ROOT / PACKAGE).rglob("*.py")}
    # The command line and its start-up, beside the package.
    for name in ("bnconvert_cli", "bnconvert_cli_startup"):
        found[name] = ROOT / f"{name}.py"
    return found


def imports_of(name, path, known):
    """The bnconvert modules that module `name` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            # `from bnconvert import walk` names a module; `from
            # bnconvert.walk import join` names its module, bnconvert.walk.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith(("bnconvert",)):
                found.add(target)
    # The package __init__ is imported by every submodule; that edge is
    # Python's, not a dependency the code chose.
    found.discard(PACKAGE)
    return found


def find_cycle(graph):
    """A list of modules forming a cycle, or `None`."""
    state = {}
    stack = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def main():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    for name in sorted(graph):
        print(f"{name} -> {', '.join(sorted(graph[name])) or '(nothing)'}")
    cycle = find_cycle(graph)
    if cycle:
        print("import cycle: " + " -> ".join(cycle), file=sys.stderr)
        return 1
    print(f"{len(graph)} modules, no import cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
