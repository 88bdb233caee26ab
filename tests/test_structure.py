"""The package's shape: no import circle between its modules (imports inside functions and under
``TYPE_CHECKING`` count too), and no function in ``train/`` longer than a screen (issue: one trainer
that every caller shares). Reads the source with ``ast``; imports nothing of cifarlab."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "cifarlab"
MAX_TRAIN_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    mods = {}
    for p in SRC.rglob("*.py"):
        parts = ("cifarlab",) + p.relative_to(SRC).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, anywhere in its file."""
    mods = _modules()
    graph = {}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        deps = set()
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                base = pkg.split(".")
                base = base[:len(base) - n.level + 1] if n.level else []
                mod = ".".join(base + ([n.module] if n.module else []))
                names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in n.names]
            else:
                continue
            deps.update(t for t in names if t in mods and t != m)
        graph[m] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_package_modules():
    graph = import_graph()
    assert len(graph) > 50 and graph["cifarlab.train.loop"]  # the graph was read
    assert cycles(graph) == []


def test_no_function_in_train_is_longer_than_a_screen():
    long = []
    for p in sorted((SRC / "train").rglob("*.py")):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = n.end_lineno - n.lineno + 1
                if length > MAX_TRAIN_FUNCTION_LINES:
                    long.append(f"{p.relative_to(SRC)}:{n.lineno} {n.name} ({length} lines)")
    assert long == []
