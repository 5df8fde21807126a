"""The import graph of the project's modules: no cycle, and the floors only import down.

Every `import` / `from ... import` statement counts, wherever it stands (module level,
inside a function, under `if TYPE_CHECKING`): a lazy import hides a cycle from the
interpreter, not from a reader. The graph is read from the source with `ast`, so the
test needs no import side effects and names the file and line of each offending edge.

Floors (DESIGN section 2): data < model < parallel < trainer; the product packages never
import `benchmarks` or `tests`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "model", "parallel", "trainer", "benchmarks", "launch")
FLOORS = {"data": 0, "model": 1, "parallel": 2, "trainer": 3}
Edge = tuple[str, str, str]  # (importer, imported, "file:line")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            out[module_name(path, root)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that `name` (a dotted import target) lies in."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_edges(modules: dict[str, Path], root: Path) -> list[Edge]:
    edges: list[Edge] = []
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importer's package
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join([*pkg, base] if base else pkg)
                # `from pkg import sub` imports the module pkg.sub when it exists
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                hit = _resolve(target, modules)
                if hit is not None and hit != mod:
                    edges.append((mod, hit, f"{path.relative_to(root)}:{node.lineno}"))
    return edges


def find_cycle(edges: list[Edge]) -> list[Edge] | None:
    """One cycle of the graph as its edges, or None (iterative depth-first search)."""
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        graph.setdefault(e[0], []).append(e)
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack: list[tuple[str, int]] = [(start, 0)]
        path: list[Edge] = []
        state[start] = 1
        while stack:
            node, i = stack[-1]
            out = graph.get(node, [])
            if i == len(out):
                state[node] = 2
                stack.pop()
                if path:
                    path.pop()
                continue
            stack[-1] = (node, i + 1)
            edge = out[i]
            nxt = edge[1]
            if state.get(nxt) == 1:  # on the stack: path[j:] leads from nxt back here
                j = next(k for k, (n, _) in enumerate(stack) if n == nxt)
                return [*path[j:], edge]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(edge)
                stack.append((nxt, 0))
    return None


def _render(cycle: list[Edge]) -> str:
    return "\n".join(f"  {a} -> {b}   ({where})" for a, b, where in cycle)


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return import_edges(project_modules(ROOT, PACKAGES), ROOT)


def test_no_import_cycle(edges: list[Edge]) -> None:
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle between the project's modules:\n" + _render(cycle or [])


def test_floors_import_only_downwards(edges: list[Edge]) -> None:
    bad = []
    for a, b, where in edges:
        top_a, top_b = a.split(".")[0], b.split(".")[0]
        if top_a in FLOORS and top_b in ("benchmarks", "tests", "launch"):
            bad.append(f"{a} -> {b} ({where}): product code imports tooling")
        elif top_a in FLOORS and top_b in FLOORS and FLOORS[top_b] > FLOORS[top_a]:
            bad.append(f"{a} -> {b} ({where}): {top_a} sits below {top_b}")
    assert not bad, "\n".join(bad)


def test_the_graph_sees_the_project(edges: list[Edge]) -> None:
    """Guards the reader itself: known edges, lazy ones included, are in the graph."""
    pairs = {(a, b) for a, b, _ in edges}
    assert ("trainer.train", "trainer.trainer") in pairs
    assert ("data.build", "data.sources.parquet_stream") in pairs
    assert ("model.smes", "model.moe.router") in pairs
    assert len(pairs) > 200


def test_a_planted_cycle_is_found(tmp_path: Path) -> None:
    """The detector on a package with a lazy (function-level) cycle a -> b -> c -> a and a
    relative import, next to an acyclic one: it names the cycle's three edges."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("def f():\n    import pkg.a\n")
    (pkg / "d.py").write_text("from pkg import a\n")
    modules = project_modules(tmp_path, ("pkg",))
    edges = import_edges(modules, tmp_path)
    cycle = find_cycle(edges)
    assert cycle is not None
    assert {(a, b) for a, b, _ in cycle} == {("pkg.a", "pkg.sub.b"), ("pkg.sub.b", "pkg.sub.c"), ("pkg.sub.c", "pkg.a")}
    (pkg / "sub" / "c.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_edges(project_modules(tmp_path, ("pkg",)), tmp_path)) is None
