"""The house's shape, read from the source (docs/architecture.md, module map): no import
circles in actors/ and pipelines/, nothing below the recipes imports them, no private name
crosses a module boundary, and the runtime reads recipes through the contract only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# below the recipes: what builds and runs them must not import them
BELOW_RECIPES = ("pipelines.runtime", "pipelines.eval", "pipelines.config", "pipelines.layouts",
                 "pipelines.registry", "pipelines.contract", "pipelines.algorithms", "actors")


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted([*ROOT.glob("actors/**/*.py"), *ROOT.glob("pipelines/**/*.py")]):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def imports(tree: ast.Module, known: set[str]) -> list[tuple[str, str]]:
    """(module, imported name) of every project import, at any depth (TYPE_CHECKING too)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in known:
                    out.append((sub, ""))
                elif node.module in known:
                    out.append((node.module, a.name))
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m, _ in imports(tree, set(mods))} - {name}
            for name, tree in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert cycles(graph()) == []


def test_nothing_below_the_recipes_imports_them():
    up = sorted((a, b) for a, targets in graph().items() for b in targets
                if a.startswith(BELOW_RECIPES) and b.startswith("pipelines.recipes"))
    assert up == []


def test_no_private_name_crosses_a_module():
    mods = modules()
    crossing = sorted((name, f"{module}.{imported}") for name, tree in mods.items()
                      for module, imported in imports(tree, set(mods))
                      if imported.startswith("_") and not imported.startswith("__"))
    assert crossing == []


def test_recipes_are_read_through_the_contract():
    probe = re.compile(r"\b(getattr|hasattr)\((self\.)?(phase|recipe)\b")
    found = [f"{path.relative_to(ROOT)}:{i}" for path in ROOT.glob("pipelines/**/*.py")
             for i, line in enumerate(path.read_text().splitlines(), 1) if probe.search(line)]
    assert found == []


def test_files_and_functions_stay_readable():
    """No module over 500 lines, no function over 60, the phase runner under 300."""
    long_files, long_functions = [], []
    for path in sorted([*ROOT.glob("actors/**/*.py"), *ROOT.glob("pipelines/**/*.py")]):
        source = path.read_text()
        name = str(path.relative_to(ROOT))
        if len(source.splitlines()) > 500:
            long_files.append(name)
        long_functions += [f"{name}:{node.name}" for node in ast.walk(ast.parse(source))
                           if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                           and node.end_lineno - node.lineno + 1 > 60]
    assert long_files == [] and long_functions == []
    assert len((ROOT / "pipelines/runtime/phase.py").read_text().splitlines()) < 300
