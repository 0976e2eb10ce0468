"""The import graph of the package has no cycle, and every module imports on its own in dependency order.

Edges are the imports a module runs when it is imported: its top-level ``import`` / ``from ... import``
statements (including those inside top-level ``try`` / ``if`` blocks, but not ``if TYPE_CHECKING:``), not the
imports inside functions, which run later and on demand. ``from scail2.a import b`` is an edge to the
submodule ``scail2.a.b`` when that is a module, else to ``scail2.a``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import scail2

PACKAGE = Path(scail2.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "_configs" in path.relative_to(PACKAGE).parts:
            continue
        parts = ("scail2", *path.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _top_level_imports(tree: ast.Module, module: str, is_package: bool) -> list[str]:
    """The absolute names of what the module imports when it is imported."""
    names: list[str] = []

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import):
                names.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                names.extend(f"{prefix}.{alias.name}" for alias in node.names)
                names.append(prefix)
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set()
        for target in _top_level_imports(tree, name, path.name == "__init__.py"):
            if target in modules and target != name:
                edges.add(target)
        # `from scail2.a import b` with b a module: the edge to scail2.a itself is implied by the one to b
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _dependency_order(graph: dict[str, set[str]]) -> list[str]:
    order: list[str] = []
    done: set[str] = set()

    def visit(v: str) -> None:
        if v in done:
            return
        done.add(v)
        for w in sorted(graph[v]):
            visit(w)
        order.append(v)

    for v in sorted(graph):
        visit(v)
    return order


def test_the_finder_sees_cycles():
    """The check itself: a cycle of three modules is found, a chain is not."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    tree = ast.parse("from . import x\nfrom .y import z\nif TYPE_CHECKING:\n    import q\ntry:\n    import r\nexcept ImportError:\n    pass\ndef f():\n    import s\n")
    names = set(_top_level_imports(tree, "p.m", is_package=False))
    assert {"p.x", "p.y.z", "r"} <= names and not names & {"q", "s"}


def test_the_package_has_no_import_cycle():
    graph = _graph()
    assert len(graph) > 100  # every module was found
    cycles = _cycles(graph)
    assert not cycles, "import cycles (module-level imports): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_every_module_imports_in_dependency_order_in_a_fresh_interpreter():
    """Every module imports, leaves first, in an interpreter that has imported nothing of the package before
    (a module whose import needs a name another module sets up at import time fails here)."""
    order = [m for m in _dependency_order(_graph()) if not m.endswith("__main__")]
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    proc = subprocess.run([sys.executable, "-c", script, *order], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _private_data_names(tree: ast.Module) -> list[str]:
    """``scail2.data...`` names with a leading underscore that a module imports or reaches through a module
    attribute, anywhere in the file (function-level imports included)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("scail2.data"):
            parts = node.module.split(".")
            found += [f"{node.module}.{alias.name}" for alias in node.names if alias.name.startswith("_")]
            found += [node.module] if any(p.startswith("_") for p in parts) else []
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("scail2.data") and "._" in a.name]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if ast.unparse(node.value).startswith("scail2.data"):
                found.append(ast.unparse(node))
    return found


def test_the_private_name_finder_sees_them():
    tree = ast.parse(
        "from scail2.data.synth import _pose, draw_posed\nimport scail2.data.sample\n"
        "def f():\n    from scail2.data.manifest import _iter_jsonl\n    return scail2.data.sample._Reads\n"
        "from scail2.data.video import read_image\nfrom scail2.preference.data import _x\n"
    )
    assert sorted(_private_data_names(tree)) == [
        "scail2.data.manifest._iter_jsonl", "scail2.data.sample._Reads", "scail2.data.synth._pose",
    ]  # fmt: skip


def test_the_preference_package_uses_only_the_public_api_of_data():
    """`scail2.preference` is built on `scail2.data`'s public names: nothing with a leading underscore."""
    modules = {name: path for name, path in _modules().items() if name.startswith("scail2.preference")}
    assert "scail2.preference.cache" in modules and "scail2.preference.builder" in modules
    private = {name: _private_data_names(ast.parse(path.read_text())) for name, path in modules.items()}
    private = {name: names for name, names in private.items() if names}
    assert not private, f"private names of scail2.data used by the preference package: {private}"
