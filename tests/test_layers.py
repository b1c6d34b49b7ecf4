"""The package's layers, read from the source: every import, at module level or inside a function.

cli -> measure, reports -> the core. The core imports none of cli, measure or reports; measure and
reports import the core only; no module reaches itself through any chain of imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "lora_planner"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
UPPER = ("cli", "measure", "reports")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's own modules that `name` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            # `from . import x` names a module; `from .m import f` names m.
            targets = [f"{base_name}.{alias.name}" for alias in node.names] + [base_name]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith(PACKAGE):
                found.add(target)
    return found


def layer(name: str) -> str:
    if name == f"{PACKAGE}.__main__":
        return "cli"  # `python -m lora_planner` is the command line's entry point
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in UPPER else "core"


GRAPH = {name: imported(name, path, set(modules())) for name, path in modules().items()}
ALLOWED = {"core": {"core"}, "measure": {"core", "measure"}, "reports": {"core", "reports"},
           "cli": {"core", "measure", "reports", "cli"}}


def ancestors(name: str) -> set[str]:
    """A package's __init__ runs before its modules: importing a.b.c imports a and a.b too."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_point_down(name):
    wrong = sorted(t for t in GRAPH[name] if layer(t) not in ALLOWED[layer(name)])
    assert not wrong, f"{name} ({layer(name)}) imports {wrong}"


def test_no_import_cycles():
    """Depth-first search over every import, function-level ones included."""
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(GRAPH.get(node, ())):
            if target in ancestors(node):
                continue  # a submodule using its own package's names is not a cycle
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_function_level_imports():
    """The checker must be able to fail: the CLI's trace command imports measure inside a function."""
    assert any(layer(t) == "measure" for t in GRAPH[f"{PACKAGE}.cli.commands"])
