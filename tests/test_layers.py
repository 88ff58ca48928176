"""The package is layered: no module imports, even inside a function, a module that imports it."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

from wmtp.hints import _HINTS
from wmtp.metadata import LoaderType, WmtpType

PACKAGE = Path(__file__).resolve().parents[1] / "wmtp"


def imports(path: Path) -> set[str]:
    """The `wmtp` modules `path` imports anywhere but under `if TYPE_CHECKING:`."""
    tree, skipped, found = ast.parse(path.read_text()), set[int](), set[str]()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for statement in node.body for n in ast.walk(statement)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (the package itself left out: everything
    lies under it)."""
    names = {p.stem: f"wmtp.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    modules = set(names.values())
    return {m: imports(PACKAGE / f"{m[5:]}.py") & modules - {m} for m in modules}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        state[module] = 2
        path.pop()
        return None

    return next((c for m in sorted(edges) if m not in state and (c := visit(m))), None)


def test_no_import_cycle_among_modules_counting_function_level_imports() -> None:
    edges = graph()
    assert edges["wmtp.load"] >= {"wmtp.explain", "wmtp.store"}, edges  # the walker sees them
    assert cycle(edges) is None, " -> ".join(cycle(edges) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_hints_name_the_schema_values() -> None:
    for field, values in (("loader_type`", LoaderType), ("wmtp_type`", WmtpType)):
        assert _HINTS[field] == f"expected one of {', '.join(map(repr, get_args(values)))}"
