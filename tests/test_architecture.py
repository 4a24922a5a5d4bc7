"""The package's shape (issue 17): no import circle between edgetl's modules, no class over 300 lines and no function
over 60 lines, and no module outside the owner reaching into another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgetl"
MAX_CLASS, MAX_FUNCTION = 300, 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _trees() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, tree: ast.Module, modules: set[str], top_level: bool) -> set[str]:
    """The edgetl modules ``name`` imports (at the top of the module only when ``top_level``)."""
    nodes = tree.body if top_level else list(ast.walk(tree))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node], _ = 2, stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("top_level", [True, False], ids=["module-level", "any-level"])
def test_no_import_circle(top_level: bool) -> None:
    """No circle among module-level imports; and none among all imports (lazy ones included) except through a
    package's ``__init__`` re-exports, which import their own submodules by design."""
    trees = _trees()
    modules = set(trees)
    graph = {name: _imports(name, path, tree, modules, top_level) for name, (path, tree) in trees.items()}
    if not top_level:  # a package's __init__ importing its submodules is not a circle between owners
        graph = {n: {d for d in deps if not n.startswith(d + ".")} for n, deps in graph.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_large_class_or_function() -> None:
    large = []
    for name, (_, tree) in _trees().items():
        for node in ast.walk(tree):
            limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > limit:
                    large.append(f"{name}.{node.name}: {length} lines (limit {limit})")
    assert not large, "; ".join(large)


def test_no_private_name_imported_across_modules() -> None:
    """``from edgetl.x import _name`` outside the package that owns ``x`` reaches into another owner's internals."""
    trees = _trees()
    crossings = []
    for name, (_, tree) in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("edgetl."):
                owner_package = node.module.rpartition(".")[0] if node.module in trees else node.module
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    if private and not name.startswith(owner_package + ".") and name != owner_package:
                        crossings.append(f"{name} imports {node.module}.{alias.name}")
    assert not crossings, "; ".join(crossings)
